"""A layout plan without process groups: per pipeline rank and virtual stage, its layers and parameter counts."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

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
    lines.append(estimate_memory(config, world_size).describe())
    return "\n".join(lines)


# Activation bytes per token and hidden unit of one transformer layer in bf16 with flash attention
# (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models": 34 s b h). Not yet
# calibrated against this model's measured peaks (the layout planner's job): treat it as an estimate.
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 34


@dataclass
class MemoryEstimate:
    """Bytes on the busiest GPU of a layout, by the arithmetic in `estimate_memory`."""

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    compute_copies: int
    activations: int
    activation_rule: str

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.compute_copies + self.activations

    def describe(self) -> str:
        gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
        return (f"memory per GPU (estimate): {gb(self.total)} = weights {gb(self.weights)} + gradients "
                f"{gb(self.gradients)} + optimizer {gb(self.optimizer)} + bf16 compute copies "
                f"{gb(self.compute_copies)} + activations {gb(self.activations)} ({self.activation_rule})")


def longest_sequence(config: Config) -> int:
    """Tokens of the longest micro-batch sequence over all data stages: the pack budget with data.packing,
    else the largest bucket's joint sequence (text + video)."""
    from ..data.buckets import Bucket
    from ..model.transformer import sequence_length

    m = config.model
    longest = 0
    for _, _, data in config.data.stage_configs():
        if data.packing:
            longest = max(longest, data.pack_tokens)
            continue
        for name in data.bucket_names():
            bucket = Bucket.parse(name)
            grid = ((bucket.frames - 1) // m.temporal_compression_ratio + 1,
                    bucket.height // data.spatial_compression_ratio, bucket.width // data.spatial_compression_ratio)
            longest = max(longest, sequence_length(m, *grid, m.max_text_seq_length))
    return longest


def estimate_memory(config: Config, world_size: int) -> MemoryEstimate:
    """Weights, gradients and optimizer state exactly as the trainer keeps them (fp32 weights, fp32 gradient
    buffer, Adam's two fp32 moments, sharded over data parallel with the distributed optimizer), the bf16
    weight copies autocast makes on GPU, and activations: with full recompute the fp32 input of every layer
    of the stage plus one layer's activations while it is recomputed; without, every layer's activations
    (34 bytes per token and hidden unit, an uncalibrated estimate)."""
    from ..parallel.context import padded_sequence_length

    p, t, m = config.parallel, config.training, config.model
    dp = p.data_parallel_size(world_size)
    plans = plan_layout(config)
    per_rank: dict[int, int] = {}
    layers: dict[int, int] = {}
    for plan in plans:
        per_rank[plan.pipeline_rank] = per_rank.get(plan.pipeline_rank, 0) + plan.parameters_per_tp_rank
        layers[plan.pipeline_rank] = layers.get(plan.pipeline_rank, 0) + plan.num_layers
    busiest = max(per_rank, key=lambda rank: (per_rank[rank], layers[rank]))
    params = per_rank[busiest]
    tokens = longest_sequence(config)
    layout = SimpleNamespace(context_parallel_size=p.context_parallel_size, sequence_parallel=p.sequence_parallel,
                             tensor_model_parallel_size=p.tensor_model_parallel_size)
    split = p.context_parallel_size * (p.tensor_model_parallel_size if p.sequence_parallel else 1)
    local_tokens = padded_sequence_length(tokens, layout) // split
    micro_tokens = local_tokens * t.micro_batch_size
    in_flight = min(p.pipeline_model_parallel_size, t.micro_batches_per_step(dp))  # 1F1B, first stage
    one_layer = ACTIVATION_BYTES_PER_TOKEN_HIDDEN * micro_tokens * m.hidden_size
    if t.recompute == "full":
        activations = layers[busiest] * in_flight * micro_tokens * m.hidden_size * 4 + one_layer
        rule = (f"full recompute: {layers[busiest]} layer inputs x {in_flight} micro-batch(es) in flight x "
                f"{micro_tokens:,} tokens x {m.hidden_size} x 4 B, plus one layer recomputed")
    else:
        activations = layers[busiest] * in_flight * one_layer
        rule = (f"{layers[busiest]} layers x {in_flight} micro-batch(es) x {ACTIVATION_BYTES_PER_TOKEN_HIDDEN} B x "
                f"{micro_tokens:,} tokens x {m.hidden_size} (uncalibrated)")
    on_gpu_bf16 = t.device == "cuda" and t.bf16
    return MemoryEstimate(
        parameters=params, weights=4 * params, gradients=4 * params,
        optimizer=8 * params // (dp * p.context_parallel_size if p.use_distributed_optimizer else 1),
        compute_copies=2 * params if on_gpu_bf16 else 0, activations=activations, activation_rule=rule)
