"""Noise schedule against diffusers, explicit uniform sampling, and the v-prediction target."""
from __future__ import annotations

import pytest
import torch

from cogvx_mega.diffusion.loss import add_noise
from cogvx_mega.diffusion.schedule import alphas_cumprod
from cogvx_mega.diffusion.timesteps import explicit_uniform_timesteps, rank_interval, uniform_timesteps


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_matches_cogvideox_ddim_scheduler(shift):
    from diffusers import CogVideoXDDIMScheduler

    reference = CogVideoXDDIMScheduler(snr_shift_scale=shift, rescale_betas_zero_snr=True,
                                       prediction_type="v_prediction").alphas_cumprod
    ours = alphas_cumprod(snr_shift_scale=shift)
    assert ours.dtype == torch.float64
    assert (ours - reference.double()).abs().max().item() <= 1e-12
    assert ours[-1].item() == pytest.approx(0.0, abs=1e-15)  # zero terminal SNR


def test_schedule_reference_values():
    # REFERENCE §5: s = 1 -> ᾱ_0 = 0.99915, ᾱ_499 ≈ 0.242; s = 3 -> ᾱ_0 ≈ 0.99745, ᾱ_499 ≈ 0.096
    s1, s3 = alphas_cumprod(snr_shift_scale=1.0), alphas_cumprod(snr_shift_scale=3.0)
    assert s1[0].item() == pytest.approx(0.99915, abs=1e-5)
    assert s1[499].item() == pytest.approx(0.242, abs=2e-3)
    assert s3[0].item() == pytest.approx(0.99745, abs=1e-5)
    assert s3[499].item() == pytest.approx(0.096, abs=2e-3)


def test_v_target_definition():
    ac = alphas_cumprod(snr_shift_scale=1.0)
    x0, noise = torch.randn(3, 2, 4, 2, 2, dtype=torch.float64), torch.randn(3, 2, 4, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    noisy, v = add_noise(x0, noise, t, ac)
    a = ac[t].sqrt().reshape(-1, 1, 1, 1, 1)
    sigma = (1 - ac[t]).sqrt().reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(noisy, a * x0 + sigma * noise)
    assert torch.allclose(v, a * noise - sigma * x0)
    # x0 is recovered from (x_t, v) as a x_t - σ v: the identity the sampler relies on
    assert torch.allclose(a * noisy - sigma * v, x0)
    # at t = 999 (zero terminal SNR) the input is pure noise and the target is -x0
    assert torch.allclose(noisy[2], noise[2]) and torch.allclose(v[2], -x0[2])


@pytest.mark.parametrize("ranks", [1, 2, 3, 8, 48])
def test_rank_intervals_partition_all_timesteps(ranks):
    covered = []
    for rank in range(ranks):
        low, high = rank_interval(rank, ranks)
        assert high > low
        covered.extend(range(low, high))
    assert covered == list(range(1000))  # in order, exactly once each: no gap, no overlap
    sizes = [rank_interval(r, ranks)[1] - rank_interval(r, ranks)[0] for r in range(ranks)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("ranks", [1, 2, 3, 8, 48])
def test_each_rank_draws_inside_its_interval_deterministically(ranks):
    for rank in range(ranks):
        low, high = rank_interval(rank, ranks)
        for step in range(5):
            draws = explicit_uniform_timesteps(16, seed=7, step=step, data_parallel_rank=rank, data_parallel_size=ranks)
            assert draws.min() >= low and draws.max() < high
            again = explicit_uniform_timesteps(16, seed=7, step=step, data_parallel_rank=rank, data_parallel_size=ranks)
            assert torch.equal(draws, again)
    steps = [explicit_uniform_timesteps(16, seed=7, step=s, data_parallel_rank=0, data_parallel_size=ranks)
             for s in range(2)]
    assert not torch.equal(steps[0], steps[1])  # a new draw every step


def _kolmogorov_distance(samples: torch.Tensor) -> float:
    """sup |empirical CDF - uniform CDF| on 0..999."""
    values = samples.double().sort().values
    n = values.numel()
    cdf = (values + 1) / 1000.0
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    lower = torch.arange(0, n, dtype=torch.float64) / n
    return max((upper - cdf).abs().max().item(), (cdf - lower).abs().max().item())


@pytest.mark.parametrize("ranks", [8, 48])
def test_pooled_draws_are_closer_to_uniform_than_independent_sampling(ranks):
    """Stratified draws of one step deviate from uniform far less than independent draws (fixed seeds)."""
    explicit, independent = [], []
    for step in range(200):
        pooled = torch.cat([explicit_uniform_timesteps(1, seed=3, step=step, data_parallel_rank=r,
                                                       data_parallel_size=ranks) for r in range(ranks)])
        plain = torch.cat([uniform_timesteps(1, seed=3, step=step, data_parallel_rank=r, data_parallel_size=ranks)
                           for r in range(ranks)])
        explicit.append(_kolmogorov_distance(pooled))
        independent.append(_kolmogorov_distance(plain))
    mean_explicit, mean_independent = sum(explicit) / 200, sum(independent) / 200
    # stratified: at most one interval width (1/ranks); independent: ~0.87/sqrt(ranks). So the gap
    # grows like sqrt(ranks); demand at least half of it.
    assert max(explicit) <= 1.0 / ranks + 1e-3
    assert mean_explicit * (ranks**0.5 / 2) < mean_independent


def test_too_many_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match="data_parallel_size=1001"):
        rank_interval(0, 1001)
