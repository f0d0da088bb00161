"""Fused expert AdaLN: LayerNorm plus each token's shift/scale in one kernel, and the gated residual add in one
kernel, forward and backward, with the modulation read per token from a small table (one row per sample or
packed clip and expert) instead of six [s, b, h] tensors per layer.

`ref.py` is the torch reference, `triton.py` the kernels, `op.py` the custom ops with autograd and the one
place that picks between them (`model.adaln_impl`).
"""
from cogvx_mega.kernels.adaln.op import gated_residual, modulated_layer_norm

__all__ = ["gated_residual", "modulated_layer_norm"]
