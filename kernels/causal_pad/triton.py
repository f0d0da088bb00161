"""Triton kernel for the causal-conv boundary input: one pass that reads the halo (or the replicated first
frame) and the first frames of the shard and writes the small [B, C, pad + n, H, W] tensor, without
materialising a padded copy of the shard, nor any copy of it: the input is read through its strides, so
a strided view (the causal conv's output narrowed to T frames, a slice of a larger clip) goes in as it is."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _boundary_kernel(x_ptr, halo_ptr, out_ptr, total, frames_out, height, width, channels,
                     x_stride_b, x_stride_c, x_stride_t, x_stride_h, x_stride_w,
                     h_stride_b, h_stride_c, h_stride_t, h_stride_h, h_stride_w,
                     PAD: tl.constexpr, HAS_HALO: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < total
    col = offsets % width
    row = (offsets // width) % height
    frame = (offsets // (width * height)) % frames_out
    plane = offsets // (width * height * frames_out)  # b * C + c
    channel = plane % channels
    batch = plane // channels
    from_x = frame >= PAD
    x_frame = tl.where(from_x, frame - PAD, 0)  # without a halo, halo frames copy frame 0
    x_index = batch * x_stride_b + channel * x_stride_c + x_frame * x_stride_t + row * x_stride_h + col * x_stride_w
    if HAS_HALO:
        halo_frame = tl.where(from_x, 0, frame)
        halo_index = (batch * h_stride_b + channel * h_stride_c + halo_frame * h_stride_t + row * h_stride_h
                      + col * h_stride_w)
        from_halo = tl.load(halo_ptr + halo_index, mask=mask & ~from_x)
        from_shard = tl.load(x_ptr + x_index, mask=mask & from_x)
        value = tl.where(from_x, from_shard, from_halo)
    else:
        value = tl.load(x_ptr + x_index, mask=mask)
    tl.store(out_ptr + offsets, value, mask=mask)


def causal_boundary_input_triton(x: torch.Tensor, halo: Optional[torch.Tensor], pad: int) -> torch.Tensor:
    """x [B, C, T, H, W] and halo [B, C, pad, H, W] of any strides -> contiguous [B, C, pad + min(T, pad), H, W]."""
    batch, channels, frames, height, width = x.shape
    taken = min(frames, pad)
    out = torch.empty(batch, channels, pad + taken, height, width, dtype=x.dtype, device=x.device)
    total = out.numel()
    if total == 0:
        return out
    halo_arg = x if halo is None else halo
    grid = (triton.cdiv(total, BLOCK),)
    _boundary_kernel[grid](x, halo_arg, out, total, pad + taken, height, width, channels,
                           *x.stride(), *halo_arg.stride(),
                           PAD=pad, HAS_HALO=halo is not None, BLOCK_SIZE=BLOCK)
    return out
