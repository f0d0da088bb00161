"""How well a VAE reconstructs video: PSNR, SSIM and the CogVideoX paper's flicker measure, on [B, 3, T, H, W]
tensors in [-1, 1] (what `CogVideoXVAE.encode`/`decode` take and give). For `cogvx vae eval` and the validation of
VAE training.

- PSNR: 10 log10(1 / MSE) on frames mapped to [0, 1], per clip, averaged over clips.
- SSIM: the structural similarity of Wang et al. (2004) with its usual settings: an 11x11 Gaussian window of
  sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2 for L = 1, population (not sample) statistics, the map averaged over
  the valid region (no padding), per channel and frame, then averaged; scikit-image's `structural_similarity` with
  `gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1` computes the same.
- Flicker (paper §3.2): the mean absolute difference between adjacent frames of the reconstruction minus that of
  the input, in [0, 1] units; positive when the reconstruction flickers more than the source.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def to_unit(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (a decoder's output can overshoot)."""
    return ((video.double() + 1) / 2).clamp(0, 1)


def psnr(video: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """[B] PSNR in dB of each clip."""
    error = (to_unit(video) - to_unit(reconstruction)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / error.clamp_min(1e-20))


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    line = torch.exp(-offsets.pow(2) / (2 * sigma ** 2))
    line = line / line.sum()
    return line[:, None] * line[None, :]


def ssim(video: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """[B] mean SSIM of each clip over its channels and frames (frames at least 11 x 11 pixels)."""
    x, y = to_unit(video), to_unit(reconstruction)
    b, c, t, h, w = x.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, not {h}x{w}")
    planes = lambda v: v.permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)  # noqa: E731
    x, y = planes(x), planes(y)
    window = _gaussian_window().to(x)[None, None]
    mean = lambda v: F.conv2d(v, window)  # noqa: E731 (valid region only, as scikit-image crops)
    mu_x, mu_y = mean(x), mean(y)
    var_x = mean(x * x) - mu_x ** 2
    var_y = mean(y * y) - mu_y ** 2
    cov = mean(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.reshape(b, t * c, -1).mean(dim=(1, 2))


def flicker(video: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """[B] mean |frame t+1 - frame t| of the reconstruction minus that of the input (0 for 1-frame clips)."""
    def temporal_change(v: torch.Tensor) -> torch.Tensor:
        v = to_unit(v)
        if v.shape[2] < 2:
            return torch.zeros(v.shape[0], dtype=v.dtype)
        return (v[:, :, 1:] - v[:, :, :-1]).abs().flatten(1).mean(1)

    return temporal_change(reconstruction) - temporal_change(video)


@dataclass
class ReconstructionScores:
    psnr: float
    ssim: float
    flicker: float

    @classmethod
    def of(cls, video: torch.Tensor, reconstruction: torch.Tensor) -> "ReconstructionScores":
        """The clip means of a batch."""
        return cls(float(psnr(video, reconstruction).mean()), float(ssim(video, reconstruction).mean()),
                   float(flicker(video, reconstruction).mean()))
