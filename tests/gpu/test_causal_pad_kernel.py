"""The causal boundary Triton kernel on a GPU against its torch reference (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frames", [1, 3, 13])
@pytest.mark.parametrize("with_halo", [False, True])
def test_boundary_kernel_matches_reference_on_gpu(dtype, frames, with_halo):
    from cogvx_mega.kernels.causal_pad import causal_boundary_input
    from cogvx_mega.kernels.causal_pad.op import use_triton
    from cogvx_mega.kernels.causal_pad.ref import causal_boundary_input_ref

    generator = torch.Generator(device="cuda").manual_seed(frames)
    # CogVideoX's widest level at a reduced frame size
    x = torch.randn(1, 128, frames, 60, 90, generator=generator, device="cuda", dtype=dtype)
    halo = torch.randn(1, 128, 2, 60, 90, generator=generator, device="cuda", dtype=dtype) if with_halo else None
    assert use_triton(x)
    x.requires_grad_()
    out = causal_boundary_input(x, halo, 2)
    expected = causal_boundary_input_ref(x.detach(), halo, 2)
    assert torch.equal(out, expected)  # a copy: exact at any dtype
    grad = torch.randn_like(out)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    causal_boundary_input_ref(x_ref, halo, 2).backward(grad)
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_boundary_kernel_reads_a_strided_view_on_gpu(dtype):
    """The halo path's real input: the causal conv's [B, C, T + pad, H, W] output narrowed to T frames."""
    from cogvx_mega.kernels.causal_pad.ref import causal_boundary_input_ref
    from cogvx_mega.kernels.causal_pad.triton import causal_boundary_input_triton

    generator = torch.Generator(device="cuda").manual_seed(0)
    buffer = torch.randn(1, 128, 15, 60, 90, generator=generator, device="cuda", dtype=dtype)
    x = buffer.narrow(2, 0, 13)
    halo = torch.randn(1, 128, 4, 60, 90, generator=generator, device="cuda", dtype=dtype)[:, :, 1:3]
    assert not x.is_contiguous() and not halo.is_contiguous()
    for given in (halo, None):
        before = torch.cuda.memory_allocated()
        out = causal_boundary_input_triton(x, given, 2)
        assert torch.cuda.memory_allocated() - before == out.untyped_storage().nbytes()  # the output only
        assert torch.equal(out, causal_boundary_input_ref(x, given, 2))


def test_vae_halo_path_on_gpu():
    """The whole VAE on the GPU: halo path (kernel) equals pad-and-concatenate."""
    from cogvx_mega.vae import CogVideoXVAE, VAEConfig

    torch.manual_seed(0)
    model = CogVideoXVAE(VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                                   norm_num_groups=8)).cuda().eval()
    video = torch.rand(1, 3, 17, 64, 64, device="cuda") * 2 - 1
    with torch.no_grad():
        halo, naive = model.encode(video), model.encode(video, conv_impl="naive")
    assert (halo - naive).abs().max().item() <= 1e-3 * naive.abs().max().item()  # TF32 convolutions on GPU
