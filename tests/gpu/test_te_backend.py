"""Transformer Engine backend against the local backend on one GPU (skipped without CUDA and TE)."""
from __future__ import annotations


import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("transformer_engine", reason="needs Transformer Engine (pip install -e .[gpu])")


def test_te_backend_matches_local_backend(tmp_path):
    from families import make_diffusers_model

    import cogvx_mega

    reference = make_diffusers_model("rope-5b")
    reference.save_pretrained(tmp_path)
    local = cogvx_mega.from_pretrained(str(tmp_path), device="cuda", backend="local")
    te = cogvx_mega.from_pretrained(str(tmp_path), device="cuda", backend="te")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, 4, 8, 12, generator=generator).cuda()
    text = torch.randn(2, 5, 12, generator=generator).cuda()
    timesteps = torch.tensor([10, 900], device="cuda")
    with torch.no_grad():
        expected = local(latents, text, timesteps)
        actual = te(latents, text, timesteps)
    # TE's fused attention and GEMMs use TF32-class kernels: compare at a tolerance for that
    assert (actual - expected).abs().max().item() <= 2e-3 * expected.abs().max().item()
