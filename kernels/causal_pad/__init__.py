"""Boundary input of a causal temporal convolution: [k-1 halo frames ; the first frames of the shard].

`ref.py` is the torch reference, `triton.py` the kernel, `op.py` the custom op with autograd and the one
place that picks between them. Used by the context-parallel and chunked VAE (`cogvx_mega.vae`).
"""
from cogvx_mega.kernels.causal_pad.op import causal_boundary_input

__all__ = ["causal_boundary_input"]
