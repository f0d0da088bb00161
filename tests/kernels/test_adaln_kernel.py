"""The fused expert AdaLN kernels (Triton interpreter on CPU) against the torch reference: LayerNorm + per-token
shift/scale and the gated residual add, forward and backward (x, LayerNorm weight and bias, branch, branch bias
and the modulation table), odd widths, rows picked per token, fp32/bf16 with the house tolerance rule; and the
whole model with adaln_impl=triton equals torch (fp32), also on a packed sequence."""
from __future__ import annotations

import pytest
import torch

from cogvx_mega.kernels.adaln.op import gated_add, gated_residual, modulate, modulated_layer_norm
from cogvx_mega.kernels.adaln.ref import gated_residual_ref, modulated_layer_norm_ref


@pytest.fixture(params=["interpreter", "torch"])
def mode(request, monkeypatch):
    """The Triton kernels (interpreted) and the ops' torch path: both must equal the reference."""
    if request.param == "torch":  # the tier's conftest turns the interpreter on; off here for the torch path
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


def atol(dtype, exact):
    return 2 * torch.finfo(dtype).eps * max(1.0, exact.abs().max().item())


def leaves(tensors, dtype):
    return [t.to(dtype, copy=True).requires_grad_() if t.is_floating_point() else t for t in tensors]


def compare(op, ref, tensors, dtype, grad_out):
    def run(fn, as_dtype):
        inputs = leaves(tensors, as_dtype)
        out = fn(*inputs)
        (out.float() * grad_out).sum().backward()
        return [out.float()] + [t.grad.float() for t in inputs if t.is_floating_point()]

    exact, low, got = run(ref, torch.float32), run(ref, dtype), run(op, dtype)
    for number, (g, l, e) in enumerate(zip(got, low, exact)):
        bound = 2 * (l - e).abs().max().item() + atol(dtype, e)
        assert (g - e).abs().max().item() <= bound, (number, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, hidden, rows", [(9, 24, 4), (5, 33, 2), (1, 8, 6)])
def test_modulated_layer_norm_matches_the_reference(mode, dtype, tokens, hidden, rows):
    generator = torch.Generator().manual_seed(tokens + hidden)
    x = 3 * torch.randn(tokens, hidden, generator=generator) + 1
    weight, bias = 1 + 0.1 * torch.randn(hidden, generator=generator), 0.1 * torch.randn(hidden, generator=generator)
    table = 0.5 * torch.randn(rows, 3, hidden, generator=generator)
    index = torch.randint(0, rows, (tokens,), generator=generator)
    grad = torch.randn(tokens, hidden, generator=generator)
    compare(lambda x, w, b, t: modulated_layer_norm(x, w, b, 1e-5, t, index),
            lambda x, w, b, t: modulated_layer_norm_ref(x, w, b, 1e-5, t, index), [x, weight, bias, table], dtype, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gated_residual_matches_the_reference(mode, dtype, with_bias):
    generator = torch.Generator().manual_seed(2)
    tokens, hidden, rows = 11, 20, 4
    x, branch = torch.randn(tokens, hidden, generator=generator), torch.randn(tokens, hidden, generator=generator)
    bias = torch.randn(hidden, generator=generator)
    table = torch.randn(rows, 3, hidden, generator=generator)
    index = torch.randint(0, rows, (tokens,), generator=generator)
    grad = torch.randn(tokens, hidden, generator=generator)
    if with_bias:
        compare(lambda x, y, b, t: gated_residual(x, y, b, t, index),
                lambda x, y, b, t: gated_residual_ref(x, y, b, t, index), [x, branch, bias, table], dtype, grad)
    else:
        compare(lambda x, y, t: gated_residual(x, y, None, t, index),
                lambda x, y, t: gated_residual_ref(x, y, None, t, index), [x, branch, table], dtype, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_torch_path_matches_the_reference(dtype):
    """`modulate` and `gated_add`, the plain torch ops of model.adaln_impl=torch, forward and backward."""
    generator = torch.Generator().manual_seed(3)
    tokens, hidden, rows = 13, 24, 4
    x = 3 * torch.randn(tokens, hidden, generator=generator) + 1
    weight, bias = 1 + 0.1 * torch.randn(hidden, generator=generator), 0.1 * torch.randn(hidden, generator=generator)
    branch, branch_bias = torch.randn(tokens, hidden, generator=generator), torch.randn(hidden, generator=generator)
    table = 0.5 * torch.randn(rows, 3, hidden, generator=generator)
    index = torch.randint(0, rows, (tokens,), generator=generator)
    grad = torch.randn(tokens, hidden, generator=generator)
    compare(lambda x, w, b, t: modulate(torch.nn.functional.layer_norm(x, (hidden,), w, b, 1e-5), t, index),
            lambda x, w, b, t: modulated_layer_norm_ref(x, w, b, 1e-5, t, index), [x, weight, bias, table], dtype, grad)
    compare(lambda x, y, b, t: gated_add(x, y, b, t, index),
            lambda x, y, b, t: gated_residual_ref(x, y, b, t, index), [x, branch, branch_bias, table], dtype, grad)


@pytest.mark.parametrize("family", ["rope-5b", "sincos-2b"])
def test_the_model_with_fused_adaln_equals_torch(family, tmp_path):
    from families import make_diffusers_model

    import cogvx_mega

    make_diffusers_model(family, std=0.1).save_pretrained(tmp_path)
    plain = cogvx_mega.from_pretrained(str(tmp_path))
    fused = cogvx_mega.from_pretrained(str(tmp_path), adaln_impl="triton", rope_impl="triton")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 2, 4, 6, 8, generator=generator)
    text = torch.randn(2, 5, 12, generator=generator)
    steps = torch.tensor([10, 900])
    expected, actual = plain(latents, text, steps), fused(latents, text, steps)
    assert (actual - expected).abs().max().item() <= 1e-5
    grads = []
    for model in (plain, fused):
        model.zero_grad(set_to_none=True)
        model(latents, text, steps).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    for name, grad in grads[0].items():
        assert (grads[1][name] - grad).abs().max().item() <= 1e-5 * max(1.0, grad.abs().max().item()), name
    if family == "rope-5b":  # a pack: per-clip modulation rows
        clips = [torch.randn(2, 4, 6, 8, generator=generator), torch.randn(1, 4, 4, 4, generator=generator)]
        texts = [torch.randn(5, 12, generator=generator), torch.randn(3, 12, generator=generator)]
        for a, e in zip(fused.forward_packed(clips, texts, steps), plain.forward_packed(clips, texts, steps)):
            assert (a - e).abs().max().item() <= 1e-5
