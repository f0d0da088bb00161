"""The Triton kernels on the GPU at CogVideoX-5B shapes (skipped without CUDA): 3D RoPE and the fused expert
AdaLN against their fp32 torch references with the house rule |kernel - ref32| <= 2 |ref_lowp - ref32| + atol,
forward and backward; the whole model with rope_impl=triton and adaln_impl=triton equals the torch path within
bf16 tolerance."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

TOKENS, TEXT, HEADS, HEAD_DIM, HIDDEN = 17776, 226, 48, 64, 3072


def atol(dtype, exact):
    return 2 * torch.finfo(dtype).eps * max(1.0, exact.abs().max().item())


def check(got, low, exact, dtype, name):
    bound = 2 * (low.float() - exact).abs().max().item() + atol(dtype, exact)
    assert (got.float() - exact).abs().max().item() <= bound, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rope_kernel_on_5b_shapes(dtype):
    from cogvx_mega.kernels.rope.op import rope_3d
    from cogvx_mega.kernels.rope.ref import rope_3d_ref

    generator = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(TOKENS, 1, 3 * HEADS, HEAD_DIM, device="cuda", generator=generator)
    angles = 45 * torch.rand(TOKENS, HEAD_DIM // 2, device="cuda", generator=generator)
    angles[:TEXT] = 0
    grad = torch.randn(TOKENS, 1, HEADS, HEAD_DIM, device="cuda", generator=generator)

    def run(fn, as_dtype):
        fused = qkv.to(as_dtype, copy=True).requires_grad_()
        q, k = fused[:, :, :HEADS], fused[:, :, HEADS:2 * HEADS]
        out_q, out_k = fn(q, k)
        torch.autograd.backward([out_q, out_k], [grad.to(as_dtype), grad.to(as_dtype)])
        return out_q, out_k, fused.grad[:, :, :2 * HEADS]

    reference = lambda q, k: (rope_3d_ref(q, angles), rope_3d_ref(k, angles))  # noqa: E731
    exact = [t.float() for t in run(reference, torch.float32)]
    low = run(reference, dtype)
    got = run(lambda q, k: rope_3d(q, k, angles), dtype)
    for name, g, lo, e in zip(("q", "k", "grad"), got, low, exact):
        check(g, lo, e, dtype, name)
    assert torch.equal(got[0][:TEXT], qkv[:TEXT, :, :HEADS].to(dtype))  # text tokens untouched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_adaln_on_5b_shapes(dtype):
    from cogvx_mega.kernels.adaln.op import gated_residual, modulated_layer_norm
    from cogvx_mega.kernels.adaln.ref import gated_residual_ref, modulated_layer_norm_ref

    generator = torch.Generator(device="cuda").manual_seed(1)
    x = 2 * torch.randn(TOKENS, HIDDEN, device="cuda", generator=generator)
    weight = 1 + 0.1 * torch.randn(HIDDEN, device="cuda", generator=generator)
    bias = 0.1 * torch.randn(HIDDEN, device="cuda", generator=generator)
    table = 0.3 * torch.randn(4, 3, HIDDEN, device="cuda", generator=generator)
    index = torch.randint(0, 4, (TOKENS,), device="cuda", generator=generator)
    branch_bias = torch.randn(HIDDEN, device="cuda", generator=generator)
    grad = torch.randn(TOKENS, HIDDEN, device="cuda", generator=generator)

    def run(norm, residual, as_dtype):
        leaves = [t.to(as_dtype, copy=True).requires_grad_() for t in (x, weight, bias, table, branch_bias)]
        xx, w, b, t, bb = leaves
        normed = norm(xx, w, b, 1e-5, t, index)
        out = residual(xx, normed, bb, t, index)
        out.backward(grad.to(as_dtype))
        return [out] + [leaf.grad for leaf in leaves]

    exact = [t.float() for t in run(modulated_layer_norm_ref, gated_residual_ref, torch.float32)]
    low = run(modulated_layer_norm_ref, gated_residual_ref, dtype)
    got = run(modulated_layer_norm, gated_residual, dtype)
    for name, g, lo, e in zip(("out", "x", "weight", "bias", "table", "branch bias"), got, low, exact):
        check(g, lo, e, dtype, name)


def test_the_model_with_the_kernels_matches_the_torch_path_in_bf16(tmp_path):
    from families import make_diffusers_model

    import cogvx_mega

    make_diffusers_model("rope-5b", std=0.1).save_pretrained(tmp_path)
    plain = cogvx_mega.from_pretrained(str(tmp_path), device="cuda", rope_impl="torch", adaln_impl="torch")
    fast = cogvx_mega.from_pretrained(str(tmp_path), device="cuda", rope_impl="triton", adaln_impl="triton")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, 4, 8, 12, generator=generator).cuda()
    text = torch.randn(2, 5, 12, generator=generator).cuda()
    steps = torch.tensor([10, 900], device="cuda")
    with torch.no_grad():
        exact = plain(latents, text, steps)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = plain(latents, text, steps).float()
            got = fast(latents, text, steps).float()
    bound = 2 * (low - exact).abs().max().item() + atol(torch.bfloat16, exact)
    assert (got - exact).abs().max().item() <= bound
