"""The whole model on the GPU in bf16 (the GPU defaults: Triton RoPE, SDPA attention) against the fp32 reference
computed on the CPU from the same weights (skipped without CUDA): CogVideoX-5B width (48 heads x 64, hidden 3072),
two layers, 1,216 tokens, the output and the gradient of the input latents, with the house rule
|gpu - ref32| <= 2 |ref_bf16 - ref32| + atol, where ref_bf16 is the same model under bf16 autocast on the CPU."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def atol(dtype, exact):
    return 2 * torch.finfo(dtype).eps * max(1.0, exact.abs().max().item())


def run(model, latents, text, steps, device, autocast):
    inputs = latents.to(device).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = model(inputs, text.to(device), steps.to(device))
    (out.float() * torch.linspace(-1, 1, out.numel(), device=device).view(out.shape)).sum().backward()
    return out.detach().float().cpu(), inputs.grad.float().cpu()


def test_the_model_in_bf16_on_the_gpu_matches_the_fp32_cpu_reference():
    from cogvx_mega.config import load_config
    from cogvx_mega.model.transformer import build_model

    config = load_config("cogvideox-5b", overrides=["model.num_layers=2"])
    m = config.model
    cpu_model = build_model(m, device="cpu", seed=3)
    gpu_model = build_model(m, device="cuda", seed=3, run_device="cuda")  # the same weights, GPU defaults
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 3, m.in_channels, 30, 44, generator=generator)  # 3 x 15 x 22 patches + 226 text
    text = torch.randn(1, m.max_text_seq_length, m.text_embed_dim, generator=generator)
    steps = torch.tensor([500])
    exact = run(cpu_model, latents, text, steps, "cpu", autocast=False)
    low = run(cpu_model, latents, text, steps, "cpu", autocast=True)
    got = run(gpu_model, latents, text, steps, "cuda", autocast=True)
    for name, g, lo, e in zip(("output", "input gradient"), got, low, exact):
        bound = 2 * (lo - e).abs().max().item() + atol(torch.bfloat16, e)
        assert (g - e).abs().max().item() <= bound, (name, (g - e).abs().max().item(), bound)
