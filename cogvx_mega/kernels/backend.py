"""The one place that decides whether a kernel runs in Triton: on CUDA tensors, or anywhere under
TRITON_INTERPRET=1 (how the CPU tests run the kernels); the torch reference otherwise."""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runs_here(x: torch.Tensor) -> bool:
    return _triton_available() and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
