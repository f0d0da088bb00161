"""The one place that turns our configs into megatron-core's TransformerConfig."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from cogvx_mega.config.model import ModelConfig
from cogvx_mega.config.parallel import ParallelConfig


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


@dataclasses.dataclass
class CogVideoXTransformerConfig(TransformerConfig):
    """megatron TransformerConfig plus the fields the expert-AdaLN layer needs."""

    time_embed_dim: int = 512
    """Width of the conditioning embedding fed to every adaptive LayerNorm."""
    qk_layernorm_epsilon: float = 1e-6
    """QK-LayerNorm eps (the block LayerNorms use `layernorm_epsilon`)."""
    packed_attention: str = "per_clip"
    """Block-diagonal attention kernel for packed sequences on the local backend (`parallel.varlen`)."""
    rope_impl: str = "torch"
    adaln_impl: str = "torch"
    """Expert AdaLN: 'torch' or 'triton' (fused LayerNorm + modulation and gated residual, `kernels.adaln`)."""
    """Who rotates q and k (`kernels.rope`): 'torch', 'triton' or 'te' ('auto' resolved at build)."""


def resolve_rope_impl(rope_impl: str, device: str) -> str:
    """'auto': the Triton kernel on CUDA, the torch reference elsewhere."""
    if rope_impl == "auto":
        return "triton" if str(device).startswith("cuda") else "torch"
    return rope_impl


def fp8_settings(model: ModelConfig, device: str) -> dict:
    """megatron's FP8 fields for `model.fp8` (empty for bf16). Checks the GPU where the recipe needs one."""
    from cogvx_mega.config.errors import ConfigError
    from cogvx_mega.config.model import FP8_RECIPES

    model.validate_fp8()
    if model.fp8 is None:
        return {}
    if not str(device).startswith("cuda"):
        raise ConfigError("model.fp8", model.fp8, f"FP8 needs a CUDA GPU, and the model is built for {device}")
    if model.fp8_recipe == "mxfp8" and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 10:
        major, minor = torch.cuda.get_device_capability()
        raise ConfigError("model.fp8_recipe", "mxfp8", f"MXFP8 needs a Blackwell GPU (compute capability 10+); this "
                                                       f"one is sm_{major}{minor}: use delayed or current")
    edge = model.fp8_bf16_edge_layers
    return dict(fp8=model.fp8, fp8_recipe=FP8_RECIPES[model.fp8_recipe], fp8_amax_history_len=model.fp8_amax_history_len,
                fp8_amax_compute_algo="max" if model.fp8_recipe == "delayed" else "most_recent",
                first_last_layers_bf16=edge > 0, num_layers_at_start_in_bf16=edge, num_layers_at_end_in_bf16=edge)


def recompute_settings(recompute: str, recompute_num_layers: int) -> dict:
    """megatron's recomputation fields for 'none', 'selective' (attention core) or 'full' (whole layers)."""
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=recompute_num_layers)
    if recompute == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return {}


def build_transformer_config(model: ModelConfig, parallel: Optional[ParallelConfig] = None,
                             params_dtype: torch.dtype = torch.float32, device: str = "cpu",
                             recompute: str = "none", recompute_num_layers: int = 1) -> CogVideoXTransformerConfig:
    parallel = parallel or ParallelConfig()
    on_cpu = device == "cpu"
    fused_bias_gelu = str(device).startswith("cuda")
    return CogVideoXTransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        kv_channels=model.attention_head_dim,
        ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
        time_embed_dim=model.time_embed_dim,
        layernorm_epsilon=model.norm_eps,
        qk_layernorm_epsilon=model.qk_norm_eps,
        packed_attention=model.packed_attention,
        rope_impl=resolve_rope_impl(model.rope_impl, device),
        adaln_impl=model.adaln_impl,
        normalization="LayerNorm",
        qk_layernorm=True,
        add_bias_linear=True,
        gated_linear_unit=False,
        # On CUDA megatron's fused bias + GeLU kernel, which computes the tanh approximation CogVideoX uses
        # (megatron selects it for activation_func=F.gelu); elsewhere the tanh GeLU unfused.
        activation_func=F.gelu if fused_bias_gelu else gelu_tanh,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=fused_bias_gelu,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        rotary_interleaved=True,  # CogVideoX rotates adjacent channel pairs (REFERENCE §3)
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        cp_comm_type=parallel.context_parallel_attention if parallel.context_parallel_size > 1 else None,
        hierarchical_context_parallel_sizes=parallel.hierarchical_context_parallel_sizes,
        sequence_parallel=parallel.sequence_parallel,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=on_cpu,
        # megatron's own initialisation stays on although initialize_weights overwrites it: only that path
        # marks tensor-parallel weights (tensor_model_parallel, partition_dim), which sharding, the gradient
        # norm and checkpoints read
        # gloo mis-orders batched isend/irecv in the interleaved schedule (silently wrong losses): use
        # separate p2p ops on CPU; NCCL batches them correctly.
        batch_p2p_comm=not on_cpu,
        init_method_std=0.02,
        **recompute_settings(recompute, recompute_num_layers),
        **fp8_settings(model, device),
    )
