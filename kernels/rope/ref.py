"""Torch reference of the 3D RoPE rotation (REFERENCE §3): adjacent channel pairs (2i, 2i+1) of every head
rotate by the token's angle i: out[2i] = x[2i] cos - x[2i+1] sin, out[2i+1] = x[2i+1] cos + x[2i] sin."""
from __future__ import annotations

import torch
from torch import Tensor


def rope_3d_ref(x: Tensor, angles: Tensor) -> Tensor:
    """x [s, b, heads, d], angles [s, d/2] (fp32, one angle per channel pair; zeros leave a token as it is)
    -> x rotated, in x's dtype. The arithmetic is fp32."""
    s, b, heads, d = x.shape
    pairs = x.float().reshape(s, b, heads, d // 2, 2)
    cos = torch.cos(angles)[:, None, None, :]  # [s, 1, 1, d/2]
    sin = torch.sin(angles)[:, None, None, :]
    even, odd = pairs[..., 0], pairs[..., 1]
    out = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return out.reshape(s, b, heads, d).to(x.dtype)


def rope_3d_ref_pair(q: Tensor, k: Tensor, angles: Tensor) -> tuple[Tensor, Tensor]:
    return rope_3d_ref(q, angles), rope_3d_ref(k, angles)
