"""Triton kernel for the causal-conv boundary input: one pass that reads the halo (or the replicated first
frame) and the first frames of the shard and writes the small [B, C, pad + n, H, W] tensor, without
materialising a padded copy of the shard."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _boundary_kernel(x_ptr, halo_ptr, out_ptr, total, frames_out, hw, x_frames,
                     PAD: tl.constexpr, HAS_HALO: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < total
    spatial = offsets % hw
    frame = (offsets // hw) % frames_out
    plane = offsets // (hw * frames_out)  # b * C + c
    from_x = frame >= PAD
    x_frame = tl.where(from_x, frame - PAD, 0)  # without a halo, halo frames copy frame 0
    x_index = (plane * x_frames + x_frame) * hw + spatial
    if HAS_HALO:
        halo_index = (plane * PAD + tl.where(from_x, 0, frame)) * hw + spatial
        from_halo = tl.load(halo_ptr + halo_index, mask=mask & ~from_x)
        from_shard = tl.load(x_ptr + x_index, mask=mask & from_x)
        value = tl.where(from_x, from_shard, from_halo)
    else:
        value = tl.load(x_ptr + x_index, mask=mask)
    tl.store(out_ptr + offsets, value, mask=mask)


def causal_boundary_input_triton(x: torch.Tensor, halo: Optional[torch.Tensor], pad: int) -> torch.Tensor:
    x = x.contiguous()
    batch, channels, frames, height, width = x.shape
    taken = min(frames, pad)
    out = torch.empty(batch, channels, pad + taken, height, width, dtype=x.dtype, device=x.device)
    total = out.numel()
    if total == 0:
        return out
    halo_arg = x if halo is None else halo.contiguous()
    grid = (triton.cdiv(total, BLOCK),)
    _boundary_kernel[grid](x, halo_arg, out, total, pad + taken, height * width, frames,
                           PAD=pad, HAS_HALO=halo is not None, BLOCK_SIZE=BLOCK)
    return out
