"""Diffusion timestep sampling.

Explicit uniform sampling (CogVideoX paper): with n data-parallel ranks, 0..T-1 is split into n
contiguous intervals that cover it exactly (sizes differ by at most one) and data-parallel rank r
draws only from interval r. The pooled draws of one step are then stratified, which lowers the
variance of the loss estimate. Draws depend only on (seed, step, data-parallel rank), so every
rank of one model-parallel group (TP/PP/CP) draws the same timesteps.
"""
from __future__ import annotations

import torch

# Keeps the timestep stream independent of every other stream seeded from the same run seed.
_TIMESTEP_STREAM = 0x7153


def rank_interval(data_parallel_rank: int, data_parallel_size: int, num_train_timesteps: int = 1000) -> tuple[int, int]:
    """[low, high) of the timesteps this data-parallel rank draws from."""
    if not 1 <= data_parallel_size <= num_train_timesteps:
        raise ValueError(f"data_parallel_size={data_parallel_size}: explicit uniform sampling needs 1..{num_train_timesteps} "
                         f"ranks (one non-empty interval each); use diffusion.timestep_sampling=uniform beyond that")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data_parallel_rank={data_parallel_rank} is outside 0..{data_parallel_size - 1}")
    low = data_parallel_rank * num_train_timesteps // data_parallel_size
    high = (data_parallel_rank + 1) * num_train_timesteps // data_parallel_size
    return low, high


def step_generator(seed: int, step: int, data_parallel_rank: int, stream: int) -> torch.Generator:
    """A CPU generator keyed on (seed, step, data-parallel rank, stream)."""
    key = (((seed * 1_000_003 + step) * 10_007 + data_parallel_rank) * 65_537 + stream) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(key)


def explicit_uniform_timesteps(batch_size: int, *, seed: int, step: int, data_parallel_rank: int,
                               data_parallel_size: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    low, high = rank_interval(data_parallel_rank, data_parallel_size, num_train_timesteps)
    generator = step_generator(seed, step, data_parallel_rank, _TIMESTEP_STREAM)
    return torch.randint(low, high, (batch_size,), generator=generator)


def uniform_timesteps(batch_size: int, *, seed: int, step: int, data_parallel_rank: int,
                      data_parallel_size: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    generator = step_generator(seed, step, data_parallel_rank, _TIMESTEP_STREAM)
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)


SAMPLERS = {"explicit_uniform": explicit_uniform_timesteps, "uniform": uniform_timesteps}


def sample_timesteps(method: str, batch_size: int, **kwargs) -> torch.Tensor:
    try:
        sampler = SAMPLERS[method]
    except KeyError:
        raise ValueError(f"diffusion.timestep_sampling={method!r}: choose one of {', '.join(SAMPLERS)}") from None
    return sampler(batch_size, **kwargs)
