"""`rope_3d`: the custom op rotating q and k by per-token angles (forward and backward by the Triton kernel
where it can run, else the torch reference), and `apply_rope_3d`, the one place that picks the
implementation for `model.rope_impl`."""
from __future__ import annotations

import torch
from torch import Tensor

from cogvx_mega.kernels.backend import triton_runs_here
from cogvx_mega.kernels.rope.ref import rope_3d_ref

ROPE_IMPLS = ("torch", "triton", "te")


def _rotate(q: Tensor, k: Tensor, angles: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    if triton_runs_here(q):
        from cogvx_mega.kernels.rope.triton import rope_3d_triton

        return rope_3d_triton(q, k, angles, (angles != 0).any(dim=1), inverse)
    sign = -1.0 if inverse else 1.0
    return rope_3d_ref(q, sign * angles).contiguous(), rope_3d_ref(k, sign * angles).contiguous()


@torch.library.custom_op("cogvx::rope_3d", mutates_args=())
def rope_3d(q: Tensor, k: Tensor, angles: Tensor) -> tuple[Tensor, Tensor]:
    """q [s, b, hq, d], k [s, b, hk, d], angles [s, d/2] fp32 -> (q, k) rotated pairwise, in their dtypes."""
    return _rotate(q, k, angles, inverse=False)


@rope_3d.register_fake
def _(q, k, angles):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _backward(ctx, grad_q, grad_k):
    (angles,) = ctx.saved_tensors
    grad_q, grad_k = _rotate(grad_q.contiguous(), grad_k.contiguous(), angles, inverse=True)
    return grad_q, grad_k, None


rope_3d.register_autograd(_backward, setup_context=_setup_context)


def rope_3d_complex(x: Tensor, rotation: Tensor) -> Tensor:
    """The torch path: each channel pair (2i, 2i+1) of x [s, b, heads, d] read as one complex number and
    multiplied by the unit rotation [s, 1, 1, d/2] (complex64) in one op, forward and backward (the reference's
    arithmetic in fp32, without its per-half temporaries) -> x rotated, in x's dtype."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [s, b, heads, d/2]
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def pair_angles(table: Tensor) -> Tensor:
    """Megatron-style angle table [s, 1, 1, d] (each angle repeated for its channel pair) -> [s, d/2] fp32."""
    return table.reshape(table.shape[0], -1)[:, ::2].float().contiguous()


def apply_rope_3d(q: Tensor, k: Tensor, table: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    """Rotate q and k [s, b, heads, d] by the per-token angle table [s, 1, 1, d] with `model.rope_impl`:
    'torch' (the reference's arithmetic as one complex multiply), 'triton' (the kernel; the reference where
    Triton cannot run) or 'te' (Transformer Engine's fused RoPE, CUDA)."""
    if impl == "torch":
        angles = pair_angles(table)
        rotation = torch.polar(torch.ones_like(angles), angles)[:, None, None, :]  # [s, 1, 1, d/2] complex64
        return rope_3d_complex(q, rotation), rope_3d_complex(k, rotation)
    if impl == "triton":
        return rope_3d(q, k, pair_angles(table))
    if impl == "te":
        try:
            from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb
        except ImportError as error:  # pragma: no cover - optional GPU package
            raise RuntimeError("model.rope_impl=te needs Transformer Engine (pip install -e .[gpu]); use torch or "
                               "triton") from error
        freqs = table.float()
        return (apply_rotary_pos_emb(q, freqs, tensor_format="sbhd", interleaved=True, fused=True),
                apply_rotary_pos_emb(k, freqs, tensor_format="sbhd", interleaved=True, fused=True))
    raise ValueError(f"model.rope_impl={impl!r}: choose one of {', '.join(ROPE_IMPLS)}")
