"""DDIM and DPM-Solver++(2M) sampling with classifier-free guidance equal diffusers' CogVideoXDDIMScheduler and
CogVideoXDPMScheduler driven the way the CogVideoX pipelines drive them (trailing spacing, v-prediction, zero terminal SNR, SNR shift), with the same tiny
model, initial latents and embeddings: within 1e-4 (fp32, CPU), at 2 guidance scales, with and without dynamic
CFG (the pipelines' formula, quirk included)."""
from __future__ import annotations

import math

import pytest
import torch

from families import make_diffusers_model

import cogvx_mega
from cogvx_mega.diffusion.sampler import SamplingSettings, sample_latents, trailing_timesteps
from cogvx_mega.diffusion.schedule import alphas_cumprod

STEPS = 6


def diffusers_loop(model, scheduler, latents, prompt, negative, guidance, dynamic, generator=None):
    """The denoising loop of diffusers' CogVideoXPipeline.__call__, on our model."""
    from diffusers import CogVideoXDPMScheduler

    scheduler.set_timesteps(STEPS)
    old_x0 = None
    for i, t in enumerate(scheduler.timesteps):
        model_input = torch.cat([latents] * 2) if guidance > 1 else latents
        model_input = scheduler.scale_model_input(model_input, t)
        text = torch.cat([negative, prompt]) if guidance > 1 else prompt
        with torch.no_grad():
            v = model(model_input, text, t.expand(model_input.shape[0])).float()
        scale = guidance
        if dynamic:
            scale = 1 + guidance * ((1 - math.cos(math.pi * ((STEPS - t.item()) / STEPS) ** 5.0)) / 2)
        if guidance > 1:
            unconditional, conditional = v.chunk(2)
            v = unconditional + scale * (conditional - unconditional)
        if isinstance(scheduler, CogVideoXDPMScheduler):
            latents, old_x0 = scheduler.step(v, old_x0, t, scheduler.timesteps[i - 1] if i > 0 else None, latents,
                                             generator=generator, return_dict=False)
        else:
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        latents = latents.to(v.dtype)
    return latents


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sampler")
    make_diffusers_model("rope-5b", std=0.1).save_pretrained(folder)
    return cogvx_mega.from_pretrained(str(folder))


@pytest.mark.parametrize("guidance, dynamic", [(1.0, False), (6.0, False), (6.0, True), (3.5, True)])
def test_ddim_with_guidance_matches_diffusers(model, guidance, dynamic):
    from diffusers import CogVideoXDDIMScheduler

    shift = 3.0
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                       rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=shift,
                                       clip_sample=False, beta_schedule="scaled_linear")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 2, 4, 6, 8, generator=generator)
    prompt, negative = torch.randn(2, 1, 5, 12, generator=generator)
    expected = diffusers_loop(model, scheduler, latents, prompt, negative, guidance, dynamic)
    actual = sample_latents(model, latents, prompt, negative, SamplingSettings(STEPS, guidance, dynamic),
                            alphas_cumprod(snr_shift_scale=shift))
    assert (actual - expected).abs().max().item() <= 1e-4
    assert trailing_timesteps(1000, STEPS) == scheduler.timesteps.tolist()


def test_zero_negative_embeddings_are_the_sat_unconditional_branch(model):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 1, 4, 4, 4, generator=generator)
    prompt = torch.randn(1, 3, 12, generator=generator)
    settings = SamplingSettings(3, 4.0)
    schedule = alphas_cumprod(snr_shift_scale=1.0)
    assert torch.equal(sample_latents(model, latents, prompt, None, settings, schedule),
                       sample_latents(model, latents, prompt, torch.zeros_like(prompt), settings, schedule))


@pytest.mark.parametrize("guidance, dynamic", [(1.0, False), (6.0, False), (6.0, True)])
def test_dpm_solver_with_guidance_matches_diffusers(model, guidance, dynamic):
    from diffusers import CogVideoXDPMScheduler

    shift = 1.0
    scheduler = CogVideoXDPMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                      rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=shift,
                                      clip_sample=False, beta_schedule="scaled_linear")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 2, 4, 6, 8, generator=generator)
    prompt, negative = torch.randn(2, 1, 5, 12, generator=generator)
    expected = diffusers_loop(model, scheduler, latents, prompt, negative, guidance, dynamic,
                              torch.Generator().manual_seed(7))
    actual = sample_latents(model, latents, prompt, negative, SamplingSettings(STEPS, guidance, dynamic, "dpm"),
                            alphas_cumprod(snr_shift_scale=shift), generator=torch.Generator().manual_seed(7))
    assert (actual - expected).abs().max().item() <= 1e-4
    other_noise = sample_latents(model, latents, prompt, negative, SamplingSettings(STEPS, guidance, dynamic, "dpm"),
                                 alphas_cumprod(snr_shift_scale=shift), generator=torch.Generator().manual_seed(8))
    assert (other_noise - expected).abs().max().item() > 1e-3  # the step noise matters: the draws line up
