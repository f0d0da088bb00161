"""v-prediction training objective (REFERENCE §5)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class NoisedBatch:
    noisy_latents: Tensor  # x_t [B, T, C, H, W]
    target: Tensor  # v [B, T, C, H, W]
    text_embeds: Tensor  # text after dropout [B, L, D]
    timesteps: Tensor  # [B] int64


def _broadcast(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, v): x_t = a x0 + √(1-a²) ε and v = a ε - √(1-a²) x0 with a = √ᾱ_t (schedule in fp64)."""
    alpha_bar = alphas_cumprod.to(latents.device)[timesteps]
    a = _broadcast(alpha_bar.sqrt().to(latents.dtype), latents)
    sigma = _broadcast((1.0 - alpha_bar).sqrt().to(latents.dtype), latents)
    return a * latents + sigma * noise, a * noise - sigma * latents


def drop_text(text_embeds: Tensor, drop_mask: Tensor) -> Tensor:
    """Replace the text of samples where drop_mask is True by zeros (the unconditional branch)."""
    return torch.where(_broadcast(drop_mask, text_embeds), torch.zeros_like(text_embeds), text_embeds)


def make_training_batch(latents: Tensor, text_embeds: Tensor, noise: Tensor, timesteps: Tensor,
                        alphas_cumprod: Tensor, text_drop_mask: Optional[Tensor] = None) -> NoisedBatch:
    noisy, target = add_noise(latents, noise, timesteps, alphas_cumprod)
    if text_drop_mask is not None:
        text_embeds = drop_text(text_embeds, text_drop_mask.to(text_embeds.device))
    return NoisedBatch(noisy, target, text_embeds, timesteps)
