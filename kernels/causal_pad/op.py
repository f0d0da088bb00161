"""`causal_boundary_input`: the custom op (forward by the Triton kernel where it can run, else the torch
reference; backward in torch: it only touches the 2*pad boundary frames)."""
from __future__ import annotations

from typing import Optional

import torch

from cogvx_mega.kernels.backend import triton_runs_here
from cogvx_mega.kernels.causal_pad.ref import causal_boundary_input_ref


def use_triton(x: torch.Tensor) -> bool:
    """Whether the boundary kernel runs in Triton here (`kernels.backend`)."""
    return triton_runs_here(x)


@torch.library.custom_op("cogvx::causal_boundary_input", mutates_args=())
def _boundary_op(x: torch.Tensor, halo: Optional[torch.Tensor], pad: int) -> torch.Tensor:
    if use_triton(x):
        from cogvx_mega.kernels.causal_pad.triton import causal_boundary_input_triton

        return causal_boundary_input_triton(x, halo, pad)
    return causal_boundary_input_ref(x, halo, pad).contiguous()


@_boundary_op.register_fake
def _(x, halo, pad):
    b, c, t, h, w = x.shape
    return x.new_empty(b, c, pad + min(t, pad), h, w)


def _setup_context(ctx, inputs, output):
    x, halo, pad = inputs
    ctx.pad = pad
    ctx.x_shape = x.shape
    ctx.has_halo = halo is not None


def _backward(ctx, grad):
    pad = ctx.pad
    grad_x = grad.new_zeros(ctx.x_shape)
    taken = grad.shape[2] - pad
    grad_x[:, :, :taken] = grad[:, :, pad:]
    grad_halo = None
    if ctx.has_halo:
        grad_halo = grad[:, :, :pad].contiguous()
    else:
        grad_x[:, :, 0] += grad[:, :, :pad].sum(dim=2)
    return grad_x, grad_halo, None


_boundary_op.register_autograd(_backward, setup_context=_setup_context)


def causal_boundary_input(x: torch.Tensor, halo: Optional[torch.Tensor], pad: int) -> torch.Tensor:
    """[halo ; x[:, :, :min(T, pad)]] along time for x [B, C, T, H, W]; halo None = `pad` copies of frame 0."""
    if x.dim() != 5:
        raise ValueError(f"causal_boundary_input expects [B, C, T, H, W], got shape {tuple(x.shape)}")
    if halo is not None and (halo.shape[2] != pad or halo.shape[:2] != x.shape[:2] or halo.shape[3:] != x.shape[3:]):
        raise ValueError(f"halo of shape {tuple(halo.shape)} does not fit x {tuple(x.shape)} with pad={pad}")
    return _boundary_op(x, halo, pad)
