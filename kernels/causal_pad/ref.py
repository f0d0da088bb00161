"""Torch reference for the causal-conv boundary input."""
from __future__ import annotations

from typing import Optional

import torch


def causal_boundary_input_ref(x: torch.Tensor, halo: Optional[torch.Tensor], pad: int) -> torch.Tensor:
    """[halo ; x[:, :, :min(T, pad)]] along time (dim 2) for x [B, C, T, H, W].

    `halo` is [B, C, pad, H, W] (the previous frames, from the previous rank or chunk) or None, which
    means the shard starts the clip: the halo is `pad` copies of its first frame (CogVideoX's causal
    padding).
    """
    head = x[:, :, : min(x.shape[2], pad)]
    if halo is None:
        halo = x[:, :, :1].expand(-1, -1, pad, -1, -1)
    return torch.cat([halo, head], dim=2)
