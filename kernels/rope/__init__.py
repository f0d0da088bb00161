"""3D RoPE applied to q and k in one call, from per-token angles (text tokens: zero angles, left as they are).

`ref.py` is the torch reference (the rotation of megatron's interleaved RoPE), `triton.py` the kernel (one
launch rotates q and k, forward and backward), `op.py` the custom op with autograd and the one place that
picks between them. Per-token angles make packed multi-clip sequences work: each token carries its own clip's
position. Used by the expert-AdaLN layer's attention (`model.rope_impl`).
"""
from cogvx_mega.kernels.rope.op import apply_rope_3d, rope_3d

__all__ = ["apply_rope_3d", "rope_3d"]
