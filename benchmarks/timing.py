"""Timing shared by the benchmarks: the median of `repeats` calls after one warm-up, synchronising CUDA."""
from __future__ import annotations

import statistics
import time

import torch


def median_seconds(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def emit_result(**fields) -> None:
    """One machine-readable line, `RESULT {json}`, that benchmarks/gpu_suite.py reads its targets from."""
    import json

    print("RESULT " + json.dumps(fields), flush=True)
