"""Triton kernels of the expert AdaLN: one program per token row of h channels (h up to a few thousand fits one
block). Statistics and arithmetic in fp32, outputs in the input dtype."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_forward(x_ptr, w_ptr, b_ptr, table_ptr, index_ptr, out_ptr, mean_ptr, rstd_ptr, hidden, eps,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x = tl.load(x_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / hidden
    centred = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / hidden + eps)
    y = centred * rstd * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32) + tl.load(
        b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    entry = tl.load(index_ptr + row) * 3 * hidden
    shift = tl.load(table_ptr + entry + cols, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(table_ptr + entry + hidden + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (y * (1.0 + scale) + shift).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _norm_backward(grad_ptr, x_ptr, w_ptr, b_ptr, table_ptr, index_ptr, mean_ptr, rstd_ptr, dx_ptr, dy_ptr,
                   gy_ptr, hidden, BLOCK: tl.constexpr):
    """dx of the row; dy = g (1 + scale) (for the weight/bias sums) and g * y (for the scale rows) per row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    g = tl.load(grad_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(ok, (x - mean) * rstd, 0.0)
    y = xhat * w + tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    entry = tl.load(index_ptr + row) * 3 * hidden
    scale = tl.load(table_ptr + entry + hidden + cols, mask=ok, other=0.0).to(tl.float32)
    dy = g * (1.0 + scale)
    dxhat = dy * w
    dx = rstd * (dxhat - tl.sum(dxhat, axis=0) / hidden - xhat * (tl.sum(dxhat * xhat, axis=0) / hidden))
    tl.store(dx_ptr + row * hidden + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dy_ptr + row * hidden + cols, dy * xhat, mask=ok)  # summed over rows: the weight gradient
    tl.store(gy_ptr + row * hidden + cols, g * y, mask=ok)


@triton.jit
def _residual_forward(x_ptr, branch_ptr, bias_ptr, table_ptr, index_ptr, out_ptr, hidden, HAS_BIAS: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    branch = tl.load(branch_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        branch += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(table_ptr + tl.load(index_ptr + row) * 3 * hidden + 2 * hidden + cols, mask=ok,
                   other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (x + gate * branch).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _residual_backward(grad_ptr, branch_ptr, bias_ptr, table_ptr, index_ptr, dbranch_ptr, gb_ptr, hidden,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """d branch = g * gate, and g * (branch + bias) per row (for the gate rows)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    g = tl.load(grad_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    branch = tl.load(branch_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        branch += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(table_ptr + tl.load(index_ptr + row) * 3 * hidden + 2 * hidden + cols, mask=ok,
                   other=0.0).to(tl.float32)
    tl.store(dbranch_ptr + row * hidden + cols, (g * gate).to(dbranch_ptr.dtype.element_ty), mask=ok)
    tl.store(gb_ptr + row * hidden + cols, g * branch, mask=ok)


def _block(hidden: int) -> int:
    return triton.next_power_of_2(hidden)


def modulated_norm_forward(x, weight, bias, eps, table, index):
    rows, hidden = x.shape
    out = torch.empty_like(x)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _norm_forward[(rows,)](x, weight, bias, table, index, out, mean, rstd, hidden, eps, BLOCK=_block(hidden))
    return out, mean, rstd


def modulated_norm_backward(grad, x, weight, bias, table, index, mean, rstd):
    """(dx, weight-gradient rows dy * xhat [N, h] fp32, g * y [N, h] fp32)."""
    rows, hidden = x.shape
    dx = torch.empty_like(x)
    dy_xhat = torch.empty(rows, hidden, dtype=torch.float32, device=x.device)
    g_y = torch.empty(rows, hidden, dtype=torch.float32, device=x.device)
    if rows:
        _norm_backward[(rows,)](grad, x, weight, bias, table, index, mean, rstd, dx, dy_xhat, g_y, hidden,
                                BLOCK=_block(hidden))
    return dx, dy_xhat, g_y


def gated_residual_forward(x, branch, branch_bias, table, index):
    rows, hidden = x.shape
    out = torch.empty_like(x)
    if rows:
        _residual_forward[(rows,)](x, branch, branch_bias if branch_bias is not None else branch, table, index, out,
                                   hidden, HAS_BIAS=branch_bias is not None, BLOCK=_block(hidden))
    return out


def gated_residual_backward(grad, branch, branch_bias, table, index):
    """(d branch [N, h], g * (branch + bias) [N, h] fp32)."""
    rows, hidden = branch.shape
    dbranch = torch.empty_like(branch)
    g_branch = torch.empty(rows, hidden, dtype=torch.float32, device=branch.device)
    if rows:
        _residual_backward[(rows,)](grad, branch, branch_bias if branch_bias is not None else branch, table, index,
                                    dbranch, g_branch, hidden, HAS_BIAS=branch_bias is not None, BLOCK=_block(hidden))
    return dbranch, g_branch
