"""Torch reference of the expert AdaLN pieces. `table` [R, 3, h] holds (shift, scale, gate) of one branch for
each modulation row; `index` [N] picks each token's row (2 x sample-or-clip + is_text)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def modulated_layer_norm_ref(x: Tensor, weight: Tensor, bias: Tensor, eps: float, table: Tensor,
                             index: Tensor) -> Tensor:
    """x [N, h] -> LayerNorm(x) * (1 + scale[index]) + shift[index]."""
    normed = torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    per_token = table[index]  # [N, 3, h]
    return normed * (1 + per_token[:, 1]) + per_token[:, 0]


def gated_residual_ref(x: Tensor, branch: Tensor, branch_bias: Optional[Tensor], table: Tensor,
                       index: Tensor) -> Tensor:
    """x [N, h] + gate[index] * (branch [N, h] + branch_bias)."""
    if branch_bias is not None:
        branch = branch + branch_bias
    return x + table[index][:, 2] * branch
