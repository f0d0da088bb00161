"""The expert-AdaLN layer passes megatron's per-layer arguments down to its attention: the context-parallel
kind (as megatron's TransformerLayer does, so Transformer Engine does not fall back to p2p for every kind)
and the process groups the model was built with."""
from __future__ import annotations

import pytest

from cogvx_mega.config import ModelConfig, ParallelConfig
from cogvx_mega.config.megatron import build_transformer_config


class RecordingCoreAttention:
    """Stands in for the core attention class of a layer spec and records how it is built."""

    built: list = []

    def __init__(self, config, layer_number, attn_mask_type=None, attention_type="self", attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        RecordingCoreAttention.built.append({"layer": layer_number, "cp_comm_type": cp_comm_type,
                                             "pg_collection": pg_collection})


@pytest.mark.parametrize("kind", ["a2a", "all_gather", "p2p", "a2a+p2p"])
def test_core_attention_is_built_with_the_configured_cp_kind(kind):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import build_module

    from cogvx_mega.model.layer import QKLayerNorm
    from cogvx_mega.model.layer_spec import _layer_spec
    from cogvx_mega.parallel.state import single_process_groups

    model = ModelConfig(num_layers=2, num_attention_heads=4, attention_head_dim=16, time_embed_dim=32,
                        text_embed_dim=32, max_text_seq_length=16, sample_height=8, sample_width=8, sample_frames=9,
                        positional_embedding="rope")
    hierarchy = [2, 2] if kind == "a2a+p2p" else None
    parallel = ParallelConfig(context_parallel_size=4, context_parallel_attention=kind,
                              hierarchical_context_parallel_sizes=hierarchy)
    config = build_transformer_config(model, parallel)
    spec = _layer_spec(column_linear=ColumnParallelLinear, row_linear=RowParallelLinear,
                       core_attention=RecordingCoreAttention, qk_norm=QKLayerNorm)
    groups = single_process_groups()
    RecordingCoreAttention.built = []
    for number in (1, 2):
        build_module(spec, config=config, layer_number=number, pg_collection=groups)
    assert [b["cp_comm_type"] for b in RecordingCoreAttention.built] == [kind, kind]
    assert all(b["pg_collection"] is groups for b in RecordingCoreAttention.built)


def test_no_cp_kind_without_context_parallel():
    from cogvx_mega.model.layer import cp_comm_type_of_layer

    model = ModelConfig(num_attention_heads=4, attention_head_dim=16)
    assert cp_comm_type_of_layer(build_transformer_config(model, ParallelConfig()), 1) is None
    config = build_transformer_config(model, ParallelConfig(context_parallel_size=2))
    config.cp_comm_type = ["p2p", "a2a"]  # megatron also takes one kind per layer
    assert [cp_comm_type_of_layer(config, n) for n in (1, 2)] == ["p2p", "a2a"]


def test_the_fused_bias_gelu_used_on_cuda_is_the_tanh_gelu():
    """On CUDA the FFN takes megatron's fused bias + GeLU (selected by activation_func=F.gelu); it must compute
    the tanh approximation, which is what the CPU path and diffusers compute."""
    import torch
    from megatron.core.fusions.fused_bias_gelu import bias_gelu_impl

    from cogvx_mega.config.megatron import build_transformer_config, gelu_tanh
    from cogvx_mega.config.model import ModelConfig

    cuda = build_transformer_config(ModelConfig(), device="cuda")
    cpu = build_transformer_config(ModelConfig(), device="cpu")
    assert cuda.bias_activation_fusion and cuda.activation_func is torch.nn.functional.gelu
    assert not cpu.bias_activation_fusion and cpu.activation_func is gelu_tanh
    generator = torch.Generator().manual_seed(0)
    x, bias = 4 * torch.randn(64, 96, generator=generator), torch.randn(96, generator=generator)
    x.requires_grad_()
    fused = bias_gelu_impl(x, bias)
    reference = gelu_tanh(x + bias)
    assert (fused - reference).abs().max().item() <= 1e-6
    (grad_fused,) = torch.autograd.grad(fused.sum(), x)
    (grad_reference,) = torch.autograd.grad(reference.sum(), x)
    assert (grad_fused - grad_reference).abs().max().item() <= 1e-5
