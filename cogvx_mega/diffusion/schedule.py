"""Noise schedule (REFERENCE §5): scaled-linear betas, SNR shift, zero-terminal-SNR rescale. fp64 throughout."""
from __future__ import annotations

import torch

from cogvx_mega.config.training import DiffusionConfig


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                   snr_shift_scale: float = 1.0, zero_terminal_snr: bool = True) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1 as float64."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    alpha_bar = alpha_bar / (snr_shift_scale + (1 - snr_shift_scale) * alpha_bar)  # SNR / s
    if zero_terminal_snr:
        root = alpha_bar.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))  # shift so √ᾱ_T = 0, keep √ᾱ_0
        alpha_bar = root**2
    return alpha_bar


def schedule_from_config(config: DiffusionConfig) -> torch.Tensor:
    return alphas_cumprod(config.num_train_timesteps, config.beta_start, config.beta_end,
                          config.snr_shift_scale, config.zero_terminal_snr)
