"""Sampling: the denoising loop of the CogVideoX pipelines with classifier-free guidance (REFERENCE §5).

DDIM on the v-prediction schedule the model was trained with (`schedule.alphas_cumprod`), "trailing" timestep
spacing, as diffusers' `CogVideoXDDIMScheduler` does it, quirks kept so results match it: the previous
timestep is t - T // steps (not the next entry of the spacing), and the last step goes to ᾱ = 1. Dynamic CFG
scales the guidance by 1 + g (1 - cos(π ((steps - t) / steps)^5)) / 2 with t the *training* timestep of the
step, as the diffusers pipelines compute it (a documented quirk: with 50 steps the scale is nearly constant).

DPM-Solver++(2M) is not built yet (issue 12).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

SCHEDULERS = ("ddim",)


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The sampling timesteps, high to low: round(arange(T, 0, -T/steps)) - 1."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"--steps {steps}: use 1..{num_train_timesteps} denoising steps")
    ratio = num_train_timesteps / steps
    return (np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1).tolist()


def dynamic_guidance_scale(guidance_scale: float, timestep: int, steps: int) -> float:
    """The pipelines' dynamic CFG at training timestep `timestep` (see the module docstring)."""
    return 1 + guidance_scale * ((1 - math.cos(math.pi * ((steps - timestep) / steps) ** 5.0)) / 2)


def ddim_step(alphas_cumprod: Tensor, v_prediction: Tensor, timestep: int, sample: Tensor, num_train_timesteps: int,
              steps: int) -> Tensor:
    """One deterministic DDIM step (eta 0) from x_t to x_prev for a v-prediction model."""
    previous = timestep - num_train_timesteps // steps
    alpha = alphas_cumprod[timestep]
    alpha_prev = alphas_cumprod[previous] if previous >= 0 else alphas_cumprod.new_tensor(1.0)
    predicted_x0 = alpha.sqrt() * sample - (1 - alpha).sqrt() * v_prediction
    to_sample = ((1 - alpha_prev) / (1 - alpha)).sqrt()
    to_x0 = alpha_prev.sqrt() - alpha.sqrt() * to_sample
    return (to_sample * sample + to_x0 * predicted_x0).to(sample.dtype)


@dataclass
class SamplingSettings:
    steps: int = 50
    guidance_scale: float = 6.0
    dynamic_cfg: bool = False
    scheduler: str = "ddim"


def sample_latents(model: Callable, latents: Tensor, prompt_embeds: Tensor, negative_embeds: Optional[Tensor],
                   settings: SamplingSettings, alphas_cumprod: Tensor, ofs=None, progress: bool = False) -> Tensor:
    """Denoise `latents` [B, T, C, H, W] (the initial noise) to clean latents with `model(latents, text,
    timesteps[, ofs=])` -> v. Guidance runs when guidance_scale > 1, batching [negative ; prompt] as the
    pipelines do; `negative_embeds` None means zeros (SAT's unconditional branch)."""
    if settings.scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler {settings.scheduler}: choose one of {', '.join(SCHEDULERS)}")
    num_train = alphas_cumprod.shape[0]
    guided = settings.guidance_scale > 1
    if guided:
        negative = torch.zeros_like(prompt_embeds) if negative_embeds is None else negative_embeds
        text = torch.cat([negative, prompt_embeds])
    else:
        text = prompt_embeds
    timesteps = trailing_timesteps(num_train, settings.steps)
    extra = {} if ofs is None else {"ofs": ofs}
    iterator = timesteps
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(timesteps, desc="denoise", unit="step")
    for timestep in iterator:
        model_input = torch.cat([latents, latents]) if guided else latents
        t = torch.full((model_input.shape[0],), timestep, dtype=torch.long, device=latents.device)
        with torch.no_grad():
            v = model(model_input, text, t, **extra).float()
        if guided:
            scale = (dynamic_guidance_scale(settings.guidance_scale, timestep, settings.steps)
                     if settings.dynamic_cfg else settings.guidance_scale)
            unconditional, conditional = v.chunk(2)
            v = unconditional + scale * (conditional - unconditional)
        latents = ddim_step(alphas_cumprod.to(latents.device), v, timestep, latents, num_train, settings.steps)
    return latents
