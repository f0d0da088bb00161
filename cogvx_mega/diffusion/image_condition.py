"""Image-to-video training inputs (REFERENCE §5; SAT's `add_noise_to_first_frame` and the diffusers I2V
fine-tuning scripts).

The model sees [noisy video latents ‖ conditioning] on the channel axis. The conditioning is the VAE latent
of the clip's first frame in latent frame 0 and zeros in every later frame. Before it is encoded, the first
frame gets Gaussian pixel noise whose level is log-normal, sigma = exp(N(mean, std)) (SAT: mean -3, std 0.5),
so the model learns not to copy the image's exact pixels. A fraction of the samples gets all-zero
conditioning (SAT's `noised_image_dropout`), which trains the unconditional branch.

Every draw is keyed on (seed, step, global sample slot) (`randomness.Stream.IMAGE_NOISE`, `IMAGE_DROP`), so
the conditioning of a sample is the same at every layout. The VAE that encodes the noised frame lives in the
data layer; it takes its posterior draw from `Stream.IMAGE_POSTERIOR`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from cogvx_mega.diffusion.randomness import Stream, slot_generator, slot_uniform


def noised_first_frames(frames: Tensor, slots: Sequence[int], *, seed: int, step: int, log_sigma_mean: float,
                        log_sigma_std: float) -> Tensor:
    """[n, 3, H, W] first frames in [-1, 1] -> the same frames with each sample's augmentation noise: sigma =
    exp(log_sigma_mean + log_sigma_std * z), then sigma * N(0, 1) per pixel, both from the slot's generator."""
    out = []
    for frame, slot in zip(frames, slots):
        generator = slot_generator(seed, step, slot, Stream.IMAGE_NOISE)
        sigma = torch.exp(log_sigma_mean + log_sigma_std * torch.randn(1, generator=generator))
        noise = torch.randn(tuple(frame.shape), generator=generator)
        out.append(frame.float() + sigma * noise.to(frame.device))
    return torch.stack(out)


def image_drop_mask(slots: Sequence[int], *, seed: int, step: int, dropout: float) -> Tensor:
    """[n] bool: the samples whose image conditioning is replaced by zeros."""
    return slot_uniform(slots, seed=seed, step=step, stream=Stream.IMAGE_DROP) < dropout


def conditioning_latents(image_latents: Tensor, latent_frames: int, drop_mask: Tensor) -> Tensor:
    """[n, 1, C, h, w] first-frame latents -> [n, latent_frames, C, h, w]: the latent in frame 0 (zeros where
    `drop_mask` is set), zeros in the later frames."""
    keep = (~drop_mask.to(image_latents.device)).to(image_latents.dtype).reshape(-1, 1, 1, 1, 1)
    first = image_latents * keep
    return torch.cat([first, first.new_zeros(first.shape[0], latent_frames - 1, *first.shape[2:])], dim=1)


def first_frame_pixels(video: Tensor) -> Tensor:
    """The first frame of a decoded clip [3, T, H, W] in [-1, 1] as uint8 [3, H, W] (what the latent cache
    stores; online mode rounds the same way, so both give the same conditioning)."""
    return ((video[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pixels_to_unit_range(frames: Tensor) -> Tensor:
    """uint8 [n, 3, H, W] -> float32 in [-1, 1]."""
    return frames.float() / 127.5 - 1.0
