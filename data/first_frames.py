"""The image latents of image-to-video training: each clip's first frame, noised as SAT augments it
(`cogvx_mega.diffusion.image_condition`), then encoded fresh at every step.

A dataset of an image-to-video run holds the first frames as uint8 [3, H, W] (the latent cache stores them
beside the video moments; online mode and the synthetic data keep them in memory) and gives each step
`image_latents` [n, 1, C, h, w] through one of these encoders:
- `VAEFirstFrameLatents`: the run's VAE; a posterior draw keyed on the slot, times the VAE's latent scale
  (divided instead for a VAE with `invert_scale_latents`, as the I2V pipelines scale the image latent);
- `ToyFirstFrameLatents`: the synthetic data's toy encoder (latent frame 0 of the same clip when un-noised).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from cogvx_mega.diffusion.image_condition import noised_first_frames, pixels_to_unit_range
from cogvx_mega.diffusion.randomness import Stream, slot_normal


class FirstFrameLatents:
    """`(frames uint8 [n, 3, H, W], slots, seed, step) -> image latents [n, 1, C, h, w]` (float32, CPU)."""

    def __init__(self, diffusion_config):
        self.log_sigma_mean = diffusion_config.image_noise_log_sigma_mean
        self.log_sigma_std = diffusion_config.image_noise_log_sigma_std

    def encode(self, frames: Tensor, slots: Sequence[int], seed: int, step: int) -> Tensor:
        raise NotImplementedError

    def __call__(self, frames: Tensor, slots: Sequence[int], seed: int, step: int) -> Tensor:
        noised = noised_first_frames(pixels_to_unit_range(frames), slots, seed=seed, step=step,
                                     log_sigma_mean=self.log_sigma_mean, log_sigma_std=self.log_sigma_std)
        return self.encode(noised, slots, seed, step)


class VAEFirstFrameLatents(FirstFrameLatents):
    def __init__(self, vae, diffusion_config, device: str = "cpu"):
        super().__init__(diffusion_config)
        self.vae, self.device = vae, device

    @torch.no_grad()
    def encode(self, frames: Tensor, slots: Sequence[int], seed: int, step: int) -> Tensor:
        weights = next(self.vae.parameters())
        mean, logvar = self.vae.encode_moments(frames[:, :, None].to(device=weights.device, dtype=weights.dtype))
        mean, logvar = mean.float().cpu(), logvar.float().cpu()  # [n, C, 1, h, w]
        noise = slot_normal(mean.shape[1:], slots, seed=seed, step=step, stream=Stream.IMAGE_POSTERIOR)
        latents = mean + torch.exp(0.5 * logvar) * noise
        c = self.vae.config
        latents = latents / c.scaling_factor if c.invert_scale_latents else latents * c.scaling_factor
        return latents.permute(0, 2, 1, 3, 4).contiguous()


class ToyFirstFrameLatents(FirstFrameLatents):
    def __init__(self, toy_encoder, diffusion_config):
        super().__init__(diffusion_config)
        self.toy_encoder = toy_encoder

    def encode(self, frames: Tensor, slots: Sequence[int], seed: int, step: int) -> Tensor:
        return self.toy_encoder(frames)  # [n, 1, C, h, w]
