"""The Triton 3D-RoPE kernel (run by the Triton interpreter on CPU) against the torch reference: forward and
backward, q and k of different head counts, odd shapes, strided views of a fused QKV tensor, text tokens
(zero angles) left exactly as they are, fp32/bf16/fp16 with the house tolerance rule
|kernel - ref32| <= 2 |ref_lowp - ref32| + atol (one rounding at the output's magnitude); and the whole model with rope_impl=triton equals torch.
"""
from __future__ import annotations

import pytest
import torch

from cogvx_mega.kernels.rope.op import apply_rope_3d, rope_3d
from cogvx_mega.kernels.rope.ref import rope_3d_ref


def atol(dtype, exact):
    """One rounding of a value of the output's magnitude in `dtype` (2 eps x max|exact|): the kernel and the
    reference both round the same fp32 result once, and may round it to neighbouring values."""
    return 2 * torch.finfo(dtype).eps * max(1.0, exact.abs().max().item())


def inputs(s, b, heads_q, heads_k, d, dtype, seed=0, text=2):
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(s, b, heads_q + 2 * heads_k, d, generator=generator)  # megatron's fused projection
    q, k = qkv[:, :, :heads_q].to(dtype), qkv[:, :, heads_q:heads_q + heads_k].to(dtype)
    angles = 40 * torch.rand(s, d // 2, generator=generator)
    angles[:text] = 0.0  # text tokens
    return q, k, angles


@pytest.mark.parametrize("implementation", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 2, 3, 1, 16), (5, 1, 4, 4, 24), (1, 3, 1, 2, 2)])
def test_forward_and_backward_match_the_reference(implementation, dtype, shape):
    """The kernel (`rope_3d`) and the torch path (`apply_rope_3d(..., "torch")`, one complex multiply)."""
    s, b, heads_q, heads_k, d = shape
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(s, b, heads_q + 2 * heads_k, d, generator=generator)  # megatron's fused projection
    angles = 40 * torch.rand(s, d // 2, generator=generator)
    angles[: s // 2] = 0.0  # text tokens
    grad_q = torch.randn(s, b, heads_q, d, generator=generator)
    grad_k = torch.randn(s, b, heads_k, d, generator=generator)

    def run(fn, as_dtype):
        fused = qkv.to(as_dtype, copy=True).requires_grad_()
        q, k = fused[:, :, :heads_q], fused[:, :, heads_q:heads_q + heads_k]  # strided views, as megatron's
        out_q, out_k = fn(q, k)
        ((out_q.float() * grad_q).sum() + (out_k.float() * grad_k).sum()).backward()
        return (out_q.float(), out_k.float(), fused.grad[:, :, :heads_q].float(),
                fused.grad[:, :, heads_q:heads_q + heads_k].float())

    reference = lambda q, k: (rope_3d_ref(q, angles), rope_3d_ref(k, angles))  # noqa: E731
    reference32 = run(reference, torch.float32)
    reference_low = run(reference, dtype)
    if implementation == "triton":
        kernel = run(lambda q, k: rope_3d(q, k, angles), dtype)
    else:  # the model's angle table [s, 1, 1, d]: each pair's angle twice
        table = angles.repeat_interleave(2, dim=1)[:, None, None, :]
        kernel = run(lambda q, k: apply_rope_3d(q, k, table, "torch"), dtype)
    for name, got, low, exact in zip(("q", "k", "grad q", "grad k"), kernel, reference_low, reference32):
        bound = 2 * (low - exact).abs().max().item() + atol(dtype, exact)
        assert (got - exact).abs().max().item() <= bound, (name, dtype, shape)


def test_text_tokens_pass_through_bit_exact_and_outputs_keep_dtype():
    q, k, angles = inputs(6, 2, 2, 2, 8, torch.bfloat16, text=3)
    out_q, out_k = rope_3d(q, k, angles)
    assert out_q.dtype == q.dtype and out_k.shape == k.shape
    assert torch.equal(out_q[:3], q[:3]) and torch.equal(out_k[:3], k[:3])
    assert not torch.equal(out_q[3:], q[3:])


def test_packed_clips_rotate_by_their_own_positions():
    """A pack's angle table is the clips' tables end to end: the kernel on the pack equals it on each clip."""
    first, second = inputs(5, 1, 2, 2, 8, torch.float32, seed=3), inputs(4, 1, 2, 2, 8, torch.float32, seed=4)
    packed_q, packed_k = rope_3d(torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]]),
                                 torch.cat([first[2], second[2]]))
    alone = [rope_3d(*clip) for clip in (first, second)]
    assert torch.allclose(packed_q, torch.cat([alone[0][0], alone[1][0]]), atol=1e-6)
    assert torch.allclose(packed_k, torch.cat([alone[0][1], alone[1][1]]), atol=1e-6)


@pytest.mark.parametrize("family", ["rope-5b", "v15-5b"])
def test_the_model_with_the_triton_rope_equals_the_torch_rope(family, tmp_path):
    from families import make_diffusers_model

    import cogvx_mega

    make_diffusers_model(family, std=0.1).save_pretrained(tmp_path)
    torch_rope = cogvx_mega.from_pretrained(str(tmp_path), rope_impl="torch")
    triton_rope = cogvx_mega.from_pretrained(str(tmp_path), rope_impl="triton")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 2, 4, 6, 8, generator=generator, requires_grad=True)
    text = torch.randn(2, 5, 12, generator=generator)
    steps = torch.tensor([10, 900])
    expected = torch_rope(latents, text, steps)
    actual = triton_rope(latents, text, steps)
    assert (actual - expected).abs().max().item() <= 1e-5
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), latents)
    (grad_actual,) = torch.autograd.grad(actual.square().sum(), latents)
    assert (grad_actual - grad_expected).abs().max().item() <= 1e-5 * max(1.0, grad_expected.abs().max().item())


def test_from_pretrained_refuses_overrides_of_weight_fields(tmp_path):
    from families import make_diffusers_model

    import cogvx_mega
    from cogvx_mega.config import ConfigError

    make_diffusers_model("rope-5b").save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="describe the checkpoint's weights"):
        cogvx_mega.from_pretrained(str(tmp_path), num_layers=3)
    with pytest.raises(ConfigError, match="model.rope_impl"):
        cogvx_mega.from_pretrained(str(tmp_path), rope_impl="cuda")
