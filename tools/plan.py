"""A layout plan without process groups: per pipeline rank and virtual stage, its layers and parameter counts."""
from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import Config

# Tensor-parallel shards: column-parallel weights and biases, row-parallel weights.
_TP_SHARDED = ("self_attention.linear_qkv.", "mlp.linear_fc1.", "self_attention.linear_proj.weight",
               "mlp.linear_fc2.weight")
_FIRST_STAGE = ("patch_embed.",)
_LAST_STAGE = ("decoder.final_layernorm.", "output_norm", "output_proj.")
_EVERY_STAGE = ("time_embedding.", "ofs_embedding.")


@dataclass
class StagePlan:
    pipeline_rank: int
    virtual_stage: int
    first_layer: int
    num_layers: int
    parameters_per_tp_rank: int


def plan_layout(config: Config) -> list[StagePlan]:
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from ..config.megatron import build_transformer_config
    from ..checkpoint.transformer import expected_shapes

    p = config.parallel
    transformer_config = build_transformer_config(config.model, p)
    shapes = expected_shapes(config.model)
    tp = p.tensor_model_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size or 1
    plans = []
    for pp_rank in range(p.pipeline_model_parallel_size):
        for stage in range(vpp):
            vp_stage = stage if vpp > 1 else None
            first = get_transformer_layer_offset(transformer_config, vp_stage, pp_rank)
            count = get_num_layers_to_build(transformer_config, vp_stage=vp_stage, pp_rank=pp_rank)
            is_first = pp_rank == 0 and stage == 0
            is_last = pp_rank == p.pipeline_model_parallel_size - 1 and stage == vpp - 1
            total = 0
            for key, shape in shapes.items():
                if key.startswith("decoder.layers."):
                    if not first <= int(key.split(".")[2]) < first + count:
                        continue
                elif key.startswith(_FIRST_STAGE):
                    if not is_first:
                        continue
                elif key.startswith(_LAST_STAGE):
                    if not is_last:
                        continue
                elif not key.startswith(_EVERY_STAGE):
                    continue
                numel = shape.numel()
                total += numel // tp if any(part in key for part in _TP_SHARDED) else numel
            plans.append(StagePlan(pp_rank, stage, first, count, total))
    return plans


def describe_layout(config: Config, world_size: int) -> str:
    p = config.parallel
    dp = p.data_parallel_size(world_size)
    lines = [f"world {world_size} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} x "
             f"CP {p.context_parallel_size} x DP {dp}"
             + (f"; {p.virtual_pipeline_model_parallel_size} virtual stages per pipeline rank"
                if p.virtual_pipeline_model_parallel_size else "")
             + ("; sequence parallel" if p.sequence_parallel else "")
             + (f"; CP attention {p.context_parallel_attention}" if p.context_parallel_size > 1 else ""),
             f"model {config.preset}: {config.model.num_layers} layers, hidden {config.model.hidden_size}, "
             f"{config.model.num_attention_heads} heads"]
    per_rank: dict[int, int] = {}
    for plan in plan_layout(config):
        per_rank[plan.pipeline_rank] = per_rank.get(plan.pipeline_rank, 0) + plan.parameters_per_tp_rank
        layers = (f"layers {plan.first_layer}..{plan.first_layer + plan.num_layers - 1}" if plan.num_layers
                  else "no layers")
        lines.append(f"  pipeline rank {plan.pipeline_rank} virtual stage {plan.virtual_stage}: {layers}, "
                     f"{plan.parameters_per_tp_rank:,} parameters per TP rank")
    lines.append("parameters per GPU (pipeline rank: count): "
                 + ", ".join(f"{r}: {n:,}" for r, n in sorted(per_rank.items())))
    return "\n".join(lines)
