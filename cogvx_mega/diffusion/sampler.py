"""Sampling: the denoising loop of the CogVideoX pipelines with classifier-free guidance (REFERENCE §5).

DDIM on the v-prediction schedule the model was trained with (`schedule.alphas_cumprod`), "trailing" timestep
spacing, as diffusers' `CogVideoXDDIMScheduler` does it, quirks kept so results match it: the previous
timestep is t - T // steps (not the next entry of the spacing), and the last step goes to ᾱ = 1. Dynamic CFG
scales the guidance by 1 + g (1 - cos(π ((steps - t) / steps)^5)) / 2 with t the *training* timestep of the
step, as the diffusers pipelines compute it (a documented quirk: with 50 steps the scale is nearly constant).

DPM-Solver++(2M), as `CogVideoXDPMScheduler` (SDE form): each step draws fresh noise from the sampling
generator (once on the first and last steps, twice elsewhere, the first draw unused), exactly as diffusers
consumes its generator, so the same seed gives the same video.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

SCHEDULERS = ("ddim", "dpm")


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


def _log_snr(alpha_bar: Tensor) -> Tensor:
    return ((alpha_bar / (1 - alpha_bar)) ** 0.5).log()


def dpm_step(alphas_cumprod: Tensor, v_prediction: Tensor, timestep: int, timestep_back: Optional[int],
             sample: Tensor, previous_x0: Optional[Tensor], num_train_timesteps: int, steps: int,
             generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    """One DPM-Solver++(2M) SDE step: (x_prev, this step's predicted x0, which the next step uses)."""
    previous = timestep - num_train_timesteps // steps
    alpha = alphas_cumprod[timestep]
    alpha_prev = alphas_cumprod[previous] if previous >= 0 else alphas_cumprod.new_tensor(1.0)
    predicted_x0 = alpha.sqrt() * sample - (1 - alpha).sqrt() * v_prediction
    lamb, lamb_next = _log_snr(alpha), _log_snr(alpha_prev)
    h = lamb_next - lamb
    to_sample = ((1 - alpha_prev) / (1 - alpha)) ** 0.5 * (-h).exp()
    to_x0 = (-2 * h).expm1() * alpha_prev**0.5
    to_noise = (1 - alpha_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5

    def noise():  # drawn where the generator lives (the pipelines' CPU generator), then moved
        where = generator.device if generator is not None else sample.device
        return torch.randn(sample.shape, generator=generator, device=where, dtype=sample.dtype).to(sample.device)

    x_prev = to_sample * sample - to_x0 * predicted_x0 + to_noise * noise()
    if previous_x0 is None or previous < 0:  # first order: the first step, and the last (noise-free) one
        return x_prev.to(sample.dtype), predicted_x0
    r = (lamb - _log_snr(alphas_cumprod[timestep_back])) / h
    denoised = (1 + 1 / (2 * r)) * predicted_x0 - (1 / (2 * r)) * previous_x0
    return (to_sample * sample - to_x0 * denoised + to_noise * noise()).to(sample.dtype), predicted_x0


@dataclass
class SamplingSettings:
    steps: int = 50
    guidance_scale: float = 6.0
    dynamic_cfg: bool = False
    scheduler: str = "ddim"


def sample_latents(model: Callable, latents: Tensor, prompt_embeds: Tensor, negative_embeds: Optional[Tensor],
                   settings: SamplingSettings, alphas_cumprod: Tensor, ofs=None, progress: bool = False,
                   generator: Optional[torch.Generator] = None, image_latents: Optional[Tensor] = None) -> Tensor:
    """Denoise `latents` [B, T, C, H, W] (the initial noise) to clean latents with `model(latents, text,
    timesteps[, ofs=])` -> v. Guidance runs when guidance_scale > 1, batching [negative ; prompt] as the
    pipelines do; `negative_embeds` None means zeros (SAT's unconditional branch). `generator`: the DPM
    sampler's step noise (the one that drew `latents`, as the pipelines use it). `image_latents` [B, T, C', H,
    W] (image-to-video): concatenated to the noisy latents on the channel axis at every step, in both branches
    of the guidance, as the I2V pipelines do."""
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
    previous_x0, timestep_back = None, None
    for timestep in iterator:
        model_input = torch.cat([latents, latents]) if guided else latents
        if image_latents is not None:
            condition = torch.cat([image_latents, image_latents]) if guided else image_latents
            model_input = torch.cat([model_input, condition.to(model_input.dtype)], dim=2)
        t = torch.full((model_input.shape[0],), timestep, dtype=torch.long, device=latents.device)
        with torch.no_grad():
            v = model(model_input, text, t, **extra).float()
        if guided:
            scale = (dynamic_guidance_scale(settings.guidance_scale, timestep, settings.steps)
                     if settings.dynamic_cfg else settings.guidance_scale)
            unconditional, conditional = v.chunk(2)
            v = unconditional + scale * (conditional - unconditional)
        schedule = alphas_cumprod.to(latents.device)
        if settings.scheduler == "ddim":
            latents = ddim_step(schedule, v, timestep, latents, num_train, settings.steps)
        else:
            latents, previous_x0 = dpm_step(schedule, v, timestep, timestep_back, latents, previous_x0, num_train,
                                            settings.steps, generator)
        timestep_back = timestep
    return latents
