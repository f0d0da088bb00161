"""Triton kernel for the 3D RoPE rotation of q and k in one launch.

One program per (token, batch): it loads the token's d/2 angles once, computes cos and sin in fp32, and
rotates every head of q and of k (the tensors are read through their strides: megatron's q/k are views of
the fused QKV projection). Tokens whose angles are all zero (text) are stored unchanged without the
arithmetic. The backward is the same kernel with the angle negated (a rotation's transpose).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(src, dst, token, sample, cos, sin, pair, pair_ok, heads, s_s, s_b, s_h, s_d, d_s, d_b, d_h,
                  BLOCK_H: tl.constexpr):
    head = tl.arange(0, BLOCK_H)
    for start in range(0, heads, BLOCK_H):
        h = start + head
        mask = (h < heads)[:, None] & pair_ok[None, :]
        base = src + token * s_s + sample * s_b + h[:, None] * s_h
        even = tl.load(base + (2 * pair)[None, :] * s_d, mask=mask, other=0.0).to(tl.float32)
        odd = tl.load(base + (2 * pair + 1)[None, :] * s_d, mask=mask, other=0.0).to(tl.float32)
        out_even = even * cos[None, :] - odd * sin[None, :]
        out_odd = odd * cos[None, :] + even * sin[None, :]
        out = dst + token * d_s + sample * d_b + h[:, None] * d_h
        tl.store(out + (2 * pair)[None, :], out_even.to(dst.dtype.element_ty), mask=mask)
        tl.store(out + (2 * pair + 1)[None, :], out_odd.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, angles_ptr, flags_ptr, batch, heads_q, heads_k,
                 q_s, q_b, q_h, q_d, k_s, k_b, k_h, k_d, qo_s, qo_b, qo_h, ko_s, ko_b, ko_h, a_s,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, SIGN: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    token = program // batch
    sample = program % batch
    pair = tl.arange(0, BLOCK_P)
    pair_ok = pair < HALF
    rotate = tl.load(flags_ptr + token) != 0  # False on text tokens: zero angles, nothing to rotate
    angle = tl.load(angles_ptr + token * a_s + pair, mask=pair_ok, other=0.0).to(tl.float32)
    cos = tl.where(rotate, tl.cos(angle), 1.0)
    sin = tl.where(rotate, tl.sin(angle) * SIGN, 0.0)
    _rotate_heads(q_ptr, q_out_ptr, token, sample, cos, sin, pair, pair_ok, heads_q, q_s, q_b, q_h, q_d,
                  qo_s, qo_b, qo_h, BLOCK_H)
    _rotate_heads(k_ptr, k_out_ptr, token, sample, cos, sin, pair, pair_ok, heads_k, k_s, k_b, k_h, k_d,
                  ko_s, ko_b, ko_h, BLOCK_H)


def rope_3d_triton(q: torch.Tensor, k: torch.Tensor, angles: torch.Tensor, rotate: torch.Tensor,
                   inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [s, b, hq, d], k [s, b, hk, d] (any strides), angles [s, d/2] fp32, rotate [s] bool/uint8 (False:
    leave the token as it is) -> rotated q, k (contiguous, the input dtypes). `inverse` rotates by -angle."""
    s, b, heads_q, d = q.shape
    heads_k = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() == 0:
        return q_out, k_out
    half = d // 2
    block_p = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(heads_q, heads_k)), max(1, 4096 // (2 * block_p)))
    _rope_kernel[(s * b,)](
        q, k, q_out, k_out, angles, rotate.to(torch.uint8), b, heads_q, heads_k,
        *q.stride(), *k.stride(), *q_out.stride()[:3], *k_out.stride()[:3], angles.stride(0),
        HALF=half, BLOCK_H=block_h, BLOCK_P=block_p, SIGN=-1.0 if inverse else 1.0)
    return q_out, k_out
