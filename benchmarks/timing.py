"""Timing shared by the benchmarks: the median of `repeats` calls after one warm-up, synchronising CUDA."""
from __future__ import annotations

import statistics
import time

import torch


def seconds_of(fn, device: str) -> float:
    """Wall seconds of one call of `fn`, CUDA synchronised before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def median_seconds(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (compilation, allocator)
    return statistics.median(seconds_of(fn, device) for _ in range(repeats))


def emit_result(**fields) -> None:
    """One machine-readable line, `RESULT {json}`, that benchmarks/gpu_suite.py reads its targets from."""
    import json

    print("RESULT " + json.dumps(fields), flush=True)
