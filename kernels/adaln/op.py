"""`modulated_layer_norm` and `gated_residual`: custom ops (Triton kernels where Triton runs, else torch doing
the same arithmetic) with their backward (`model.adaln_impl=triton`); `modulate` and `gated_add`, the same
arithmetic in plain torch ops (`model.adaln_impl=torch`); and `ADALN_IMPLS`, the choice.

Gradients of the modulation table are sums over the tokens of each row, taken as a one-hot matrix product
(deterministic, unlike scattered atomic adds)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from cogvx_mega.kernels.backend import triton_runs_here

ADALN_IMPLS = ("torch", "triton")


def _rows_sum(index: Tensor, rows: int, values: Tensor) -> Tensor:
    """[R, h]: per modulation row, the sum of `values` [N, h] over its tokens."""
    return torch.nn.functional.one_hot(index, rows).to(values.dtype).t() @ values


# --- LayerNorm + shift/scale ---------------------------------------------------------------------------------

def _norm_forward_torch(x, weight, bias, eps, table, index):
    x32 = x.float()
    mean = x32.mean(dim=1)
    rstd = torch.rsqrt(((x32 - mean[:, None]) ** 2).mean(dim=1) + eps)
    y = (x32 - mean[:, None]) * rstd[:, None] * weight.float() + bias.float()
    per_token = table.float()[index]
    return (y * (1 + per_token[:, 1]) + per_token[:, 0]).to(x.dtype), mean, rstd


def _norm_backward_torch(grad, x, weight, bias, table, index, mean, rstd):
    xhat = (x.float() - mean[:, None]) * rstd[:, None]
    y = xhat * weight.float() + bias.float()
    g = grad.float()
    dy = g * (1 + table.float()[index][:, 1])
    dxhat = dy * weight.float()
    dx = rstd[:, None] * (dxhat - dxhat.mean(dim=1, keepdim=True) - xhat * (dxhat * xhat).mean(dim=1, keepdim=True))
    return dx.to(x.dtype), dy * xhat, g * y


@torch.library.custom_op("cogvx::modulated_layer_norm", mutates_args=())
def _norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float, table: Tensor,
             index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if triton_runs_here(x):
        from cogvx_mega.kernels.adaln.triton import modulated_norm_forward

        return modulated_norm_forward(x, weight, bias, eps, table, index)
    return _norm_forward_torch(x, weight, bias, eps, table, index)


@_norm_op.register_fake
def _(x, weight, bias, eps, table, index):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(
        x.shape[0], dtype=torch.float32)


def _norm_setup(ctx, inputs, output):
    x, weight, bias, eps, table, index = inputs
    ctx.save_for_backward(x, weight, bias, table, index, output[1], output[2])


def _norm_backward(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, bias, table, index, mean, rstd = ctx.saved_tensors
    grad = grad.contiguous()
    if triton_runs_here(x):
        from cogvx_mega.kernels.adaln.triton import modulated_norm_backward

        dx, dy_xhat, g_y = modulated_norm_backward(grad, x, weight, bias, table, index, mean, rstd)
    else:
        dx, dy_xhat, g_y = _norm_backward_torch(grad, x, weight, bias, table, index, mean, rstd)
    rows = table.shape[0]
    d_shift = _rows_sum(index, rows, grad.float())  # [R, h]
    d_scale = _rows_sum(index, rows, g_y)
    d_table = torch.stack([d_shift, d_scale, torch.zeros_like(d_shift)], dim=1).to(table.dtype)
    d_weight = dy_xhat.sum(dim=0).to(weight.dtype)
    d_bias = ((1 + table.float()[:, 1]) * d_shift).sum(dim=0).to(bias.dtype)  # sum of g (1 + scale) over tokens
    return dx, d_weight, d_bias, None, d_table, None


_norm_op.register_autograd(_norm_backward, setup_context=_norm_setup)


# --- gated residual add --------------------------------------------------------------------------------------

@torch.library.custom_op("cogvx::gated_residual", mutates_args=())
def _residual_op(x: Tensor, branch: Tensor, branch_bias: Optional[Tensor], table: Tensor, index: Tensor) -> Tensor:
    if triton_runs_here(x):
        from cogvx_mega.kernels.adaln.triton import gated_residual_forward

        return gated_residual_forward(x, branch, branch_bias, table, index)
    full = branch.float() if branch_bias is None else branch.float() + branch_bias.float()
    return (x.float() + table.float()[index][:, 2] * full).to(x.dtype)


@_residual_op.register_fake
def _(x, branch, branch_bias, table, index):
    return x.new_empty(x.shape)


def _residual_setup(ctx, inputs, output):
    x, branch, branch_bias, table, index = inputs
    ctx.has_bias = branch_bias is not None
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(branch, branch_bias if branch_bias is not None else branch, table, index)


def _residual_backward(ctx, grad):
    branch, branch_bias, table, index = ctx.saved_tensors
    branch_bias = branch_bias if ctx.has_bias else None
    grad = grad.contiguous()
    if triton_runs_here(grad):
        from cogvx_mega.kernels.adaln.triton import gated_residual_backward

        d_branch, g_branch = gated_residual_backward(grad, branch, branch_bias, table, index)
    else:
        full = branch.float() if branch_bias is None else branch.float() + branch_bias.float()
        d_branch = (grad.float() * table.float()[index][:, 2]).to(branch.dtype)
        g_branch = grad.float() * full
    d_gate = _rows_sum(index, table.shape[0], g_branch)
    d_table = torch.stack([torch.zeros_like(d_gate), torch.zeros_like(d_gate), d_gate], dim=1).to(table.dtype)
    d_bias = d_branch.float().sum(dim=0).to(branch_bias.dtype) if branch_bias is not None else None
    return grad.to(ctx.x_dtype), d_branch, d_bias, d_table, None


_residual_op.register_autograd(_residual_backward, setup_context=_residual_setup)


# --- the torch path (model.adaln_impl=torch) ---------------------------------------------------------------

def modulate(normed: Tensor, table: Tensor, index: Tensor) -> Tensor:
    """normed * (1 + scale[index]) + shift[index] for normed [..., h] (a LayerNorm's output), index [...] into
    table [R, 3, h]: each token's row is looked up with `embedding`, whose backward sums the rows' gradients
    without the sort of an indexed add, and 1 + scale is formed on the small table, not per token."""
    rows, hidden = table.shape[0], table.shape[-1]
    shift_scale = torch.cat([table[:, :1], 1 + table[:, 1:2]], dim=1).reshape(rows, 2 * hidden)
    shift, scale = torch.nn.functional.embedding(index, shift_scale).unflatten(-1, (2, hidden)).unbind(-2)
    return torch.addcmul(shift, normed, scale)


def gated_add(x: Tensor, branch: Tensor, branch_bias: Optional[Tensor], table: Tensor, index: Tensor) -> Tensor:
    """x + gate[index] * (branch + branch_bias) for x, branch [..., h], in plain torch ops."""
    if branch_bias is not None:
        branch = branch + branch_bias
    return torch.addcmul(x, torch.nn.functional.embedding(index, table[:, 2]), branch)


# --- public -------------------------------------------------------------------------------------------------

def modulated_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, table: Tensor, index: Tensor) -> Tensor:
    """LayerNorm(x) * (1 + scale[index]) + shift[index] for x [..., h], index [...] into table [R, 3, h]."""
    hidden = x.shape[-1]
    out, _, _ = _norm_op(x.reshape(-1, hidden).contiguous(), weight.contiguous(), bias.contiguous(), float(eps),
                         table.contiguous(), index.reshape(-1).contiguous())
    return out.view(x.shape)


def gated_residual(x: Tensor, branch: Tensor, branch_bias: Optional[Tensor], table: Tensor, index: Tensor) -> Tensor:
    """x + gate[index] * (branch + branch_bias) for x, branch [..., h]."""
    hidden = x.shape[-1]
    out = _residual_op(x.reshape(-1, hidden).contiguous(), branch.reshape(-1, hidden).contiguous(),
                       branch_bias.contiguous() if branch_bias is not None else None, table.contiguous(),
                       index.reshape(-1).contiguous())
    return out.view(x.shape)
