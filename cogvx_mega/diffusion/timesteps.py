"""Diffusion timestep sampling, keyed on the global sample slot (see `randomness.py`).

Explicit uniform sampling (CogVideoX paper): with a global batch of G samples, 0..T-1 is split into G
contiguous strata covering it exactly (sizes differ by at most one) and slot j draws uniformly inside
stratum j. Data-parallel rank r holds a contiguous block of slots, so its draws fall exactly inside
interval r of the data-parallel split (`rank_interval`), as the paper asks; one process holding the
whole global batch draws the same stratified timesteps. The pooled draws of a step are stratified,
which lowers the variance of the loss estimate.
"""
from __future__ import annotations

from typing import Sequence

import torch

from cogvx_mega.diffusion.randomness import Stream, slot_generator


def stratum(slot: int, global_batch: int, num_train_timesteps: int = 1000) -> tuple[int, int]:
    """[low, high) of the timesteps slot `slot` of a global batch of `global_batch` draws from."""
    check_strata(global_batch, num_train_timesteps)
    if not 0 <= slot < global_batch:
        raise ValueError(f"slot={slot} is outside the global batch 0..{global_batch - 1}")
    return slot * num_train_timesteps // global_batch, (slot + 1) * num_train_timesteps // global_batch


def check_strata(global_batch: int, num_train_timesteps: int = 1000) -> None:
    if not 1 <= global_batch <= num_train_timesteps:
        raise ValueError(f"global batch {global_batch}: explicit uniform sampling gives each sample of the global "
                         f"batch its own non-empty stratum of the {num_train_timesteps} timesteps, so it needs "
                         f"1..{num_train_timesteps} samples per step; use diffusion.timestep_sampling=uniform or a "
                         f"smaller global batch")


def rank_interval(data_parallel_rank: int, data_parallel_size: int, num_train_timesteps: int = 1000) -> tuple[int, int]:
    """[low, high) of the timesteps data-parallel rank r's slots draw from: the union of its strata."""
    if not 1 <= data_parallel_size <= num_train_timesteps:
        raise ValueError(f"data_parallel_size={data_parallel_size}: explicit uniform sampling needs 1..{num_train_timesteps} "
                         f"ranks (one non-empty interval each); use diffusion.timestep_sampling=uniform beyond that")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data_parallel_rank={data_parallel_rank} is outside 0..{data_parallel_size - 1}")
    low = data_parallel_rank * num_train_timesteps // data_parallel_size
    high = (data_parallel_rank + 1) * num_train_timesteps // data_parallel_size
    return low, high


def explicit_uniform_timesteps(slots: Sequence[int], *, global_batch: int, seed: int, step: int,
                               num_train_timesteps: int = 1000) -> torch.Tensor:
    """[len(slots)] int64: slot j uniform in its stratum."""
    draws = []
    for slot in slots:
        low, high = stratum(slot, global_batch, num_train_timesteps)
        draws.append(torch.randint(low, high, (1,), generator=slot_generator(seed, step, slot, Stream.TIMESTEP)))
    return torch.cat(draws) if draws else torch.empty(0, dtype=torch.long)


def uniform_timesteps(slots: Sequence[int], *, global_batch: int, seed: int, step: int,
                      num_train_timesteps: int = 1000) -> torch.Tensor:
    """[len(slots)] int64: every slot uniform in 0..T-1."""
    draws = [torch.randint(0, num_train_timesteps, (1,), generator=slot_generator(seed, step, slot, Stream.TIMESTEP))
             for slot in slots]
    return torch.cat(draws) if draws else torch.empty(0, dtype=torch.long)


SAMPLERS = {"explicit_uniform": explicit_uniform_timesteps, "uniform": uniform_timesteps}


def sample_timesteps(method: str, slots: Sequence[int], **kwargs) -> torch.Tensor:
    try:
        sampler = SAMPLERS[method]
    except KeyError:
        raise ValueError(f"diffusion.timestep_sampling={method!r}: choose one of {', '.join(SAMPLERS)}") from None
    return sampler(slots, **kwargs)
