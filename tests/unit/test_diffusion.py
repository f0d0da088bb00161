"""Noise schedule against diffusers, explicit uniform sampling, and the v-prediction target."""
from __future__ import annotations

import pytest
import torch

from cogvx_mega.diffusion.loss import add_noise
from cogvx_mega.diffusion.schedule import alphas_cumprod
from cogvx_mega.config import ConfigError, load_config
from cogvx_mega.diffusion.randomness import Stream, slot_normal, slot_uniform
from cogvx_mega.diffusion.timesteps import explicit_uniform_timesteps, rank_interval, stratum, uniform_timesteps


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


def assert_partition_of_all_timesteps(intervals: list[tuple[int, int]]) -> None:
    """Non-empty intervals covering 0..999 in order, exactly once each (no gap, no overlap), sizes within one."""
    covered = []
    for low, high in intervals:
        assert high > low
        covered.extend(range(low, high))
    assert covered == list(range(1000))
    sizes = [high - low for low, high in intervals]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("global_batch", [1, 2, 3, 8, 48, 1000])
def test_strata_partition_all_timesteps(global_batch):
    assert_partition_of_all_timesteps([stratum(slot, global_batch) for slot in range(global_batch)])


@pytest.mark.parametrize("ranks", [1, 2, 3, 8, 48])
def test_rank_intervals_partition_all_timesteps(ranks):
    assert_partition_of_all_timesteps([rank_interval(rank, ranks) for rank in range(ranks)])


@pytest.mark.parametrize("ranks, per_rank", [(1, 16), (2, 3), (3, 5), (8, 2), (48, 1)])
def test_each_rank_draws_inside_its_interval_deterministically(ranks, per_rank):
    """A rank's contiguous block of slots draws exactly inside interval r of the data-parallel split."""
    global_batch = ranks * per_rank
    for rank in range(ranks):
        low, high = rank_interval(rank, ranks)
        slots = range(rank * per_rank, (rank + 1) * per_rank)
        assert (stratum(slots[0], global_batch)[0], stratum(slots[-1], global_batch)[1]) == (low, high)
        for step in range(5):
            draws = explicit_uniform_timesteps(slots, global_batch=global_batch, seed=7, step=step)
            assert draws.min() >= low and draws.max() < high
            again = explicit_uniform_timesteps(slots, global_batch=global_batch, seed=7, step=step)
            assert torch.equal(draws, again)
    steps = [explicit_uniform_timesteps(range(global_batch), global_batch=global_batch, seed=7, step=s)
             for s in range(2)]
    assert not torch.equal(steps[0], steps[1])  # a new draw every step


def test_draws_depend_on_the_slot_not_on_how_slots_are_split():
    """One process holding all 8 slots draws what 2 or 4 data-parallel ranks draw for their blocks."""
    whole = explicit_uniform_timesteps(range(8), global_batch=8, seed=3, step=5)
    noise = slot_normal((2, 3), range(8), seed=3, step=5, stream=Stream.NOISE)
    for ranks in (2, 4):
        per_rank = 8 // ranks
        blocks = [range(r * per_rank, (r + 1) * per_rank) for r in range(ranks)]
        assert torch.equal(torch.cat([explicit_uniform_timesteps(b, global_batch=8, seed=3, step=5) for b in blocks]),
                           whole)
        assert torch.equal(torch.cat([slot_normal((2, 3), b, seed=3, step=5, stream=Stream.NOISE) for b in blocks]),
                           noise)
    # streams are independent: the same slot's noise and text-drop draws are not the same numbers
    assert not torch.equal(slot_uniform(range(8), seed=3, step=5, stream=Stream.TEXT_DROP),
                           slot_uniform(range(8), seed=3, step=5, stream=Stream.NOISE))


def _kolmogorov_distance(samples: torch.Tensor) -> float:
    """sup |empirical CDF - uniform CDF| on 0..999."""
    values = samples.double().sort().values
    n = values.numel()
    cdf = (values + 1) / 1000.0
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    lower = torch.arange(0, n, dtype=torch.float64) / n
    return max((upper - cdf).abs().max().item(), (cdf - lower).abs().max().item())


@pytest.mark.parametrize("global_batch", [8, 48])
def test_pooled_draws_are_closer_to_uniform_than_independent_sampling(global_batch):
    """Stratified draws of one step deviate from uniform far less than independent draws (fixed seeds)."""
    explicit, independent = [], []
    slots = range(global_batch)
    for step in range(200):
        explicit.append(_kolmogorov_distance(explicit_uniform_timesteps(slots, global_batch=global_batch, seed=3,
                                                                        step=step)))
        independent.append(_kolmogorov_distance(uniform_timesteps(slots, global_batch=global_batch, seed=3,
                                                                  step=step)))
    mean_explicit, mean_independent = sum(explicit) / 200, sum(independent) / 200
    # stratified: at most one stratum width (1/G); independent: ~0.87/sqrt(G). So the gap grows like
    # sqrt(G); demand at least half of it.
    assert max(explicit) <= 1.0 / global_batch + 1e-3
    assert mean_explicit * (global_batch**0.5 / 2) < mean_independent


def test_too_many_ranks_or_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="data_parallel_size=1001"):
        rank_interval(0, 1001)
    with pytest.raises(ValueError, match="global batch 1001"):
        explicit_uniform_timesteps(range(2), global_batch=1001, seed=0, step=0)
    with pytest.raises(ConfigError, match="at most 1000"):
        load_config("tiny", overrides=["training.micro_batch_size=1", "training.global_batch_size=1024"]).check_world(4)
