"""The megatron-core CPU compatibility layer: CUDA-only calls made by megatron work on a CPU-only torch."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_initialized(), reason="the layer needs a process that has not used CUDA")


def test_cuda_device_arguments_become_cpu():
    from cogvx_mega.parallel import cpu_compat

    cpu_compat.enable()
    assert cpu_compat.is_enabled()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"

    class AllocatesInBackward(torch.autograd.Function):  # torch-function modes are off in backward
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return torch.full(grad.shape, 2.0, device=torch.cuda.current_device()) * grad

    leaf = torch.ones(3, requires_grad=True)
    AllocatesInBackward.apply(leaf).sum().backward()
    assert torch.equal(leaf.grad, torch.full((3,), 2.0))
    x = torch.arange(3.0)
    assert x.cuda() is x and x.to("cuda").device.type == "cpu" and x.to(0).device.type == "cpu"
    assert x.to(torch.float64).dtype == torch.float64  # dtype conversions untouched
    assert x.type() == "torch.cuda.FloatTensor" and x.type(torch.float64).dtype == torch.float64
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda.current_stream().wait_stream(stream)
    event = torch.cuda.Event()
    event.record()
    event.synchronize()


def test_megatron_rng_tracker_forks_reproducibly():
    from megatron.core import tensor_parallel

    from cogvx_mega.parallel.state import initialize_parallel

    def draws(seed):
        initialize_parallel(device="cpu", seed=seed)  # seeds megatron's tracker, then the default generator
        torch.manual_seed(0)
        outside_before = torch.get_rng_state()
        with tensor_parallel.get_cuda_rng_tracker().fork():
            inside = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), outside_before)  # fork restores the default stream
        return inside

    assert torch.equal(draws(5), draws(5))
    assert not torch.equal(draws(5), draws(6))  # the tracker's stream follows its seed
