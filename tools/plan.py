"""A layout plan without process groups: per pipeline rank and virtual stage, its layers and parameter counts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from types import SimpleNamespace

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.schema import Config

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

    from cogvx_mega.config.megatron import build_transformer_config
    from cogvx_mega.checkpoint.transformer import expected_shapes

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


# Activations of one transformer layer, in elements per token and hidden unit, kept for the backward pass
# (local backend, attention through torch SDPA, which keeps no S x S scores): 28.4, and 1.7 for the patch
# embedding, head and loss, measured from the allocator's events of tiny models on CPU (fp32; 2 to 8 layers,
# hidden 64 and 128, 400 to 1,200 tokens per micro-batch: `benchmarks/memory_peaks.py`; 31 before the expert
# AdaLN looked its modulation up per token once instead of keeping a gathered (shift, scale, gate) copy and
# 1 + scale). Korthikanti et al. count 34 bytes = 17 bf16 elements for a GPT layer; the expert AdaLN's
# modulated norms and gates keep more.
ACTIVATION_ELEMENTS_PER_TOKEN_HIDDEN = 28.4
HEAD_ELEMENTS_PER_TOKEN_HIDDEN = 1.7
# How the layout changes a layer's share (measured the same way at TP2 and CP2): without sequence parallel 12.4
# of the per-layer elements (attention and MLP internals) are split over TP and the rest is replicated; with it every
# element is split but the rank keeps 12% more (the gathered inputs of the column-parallel layers); context
# parallelism keeps 14% more per local token (the all-to-all / all-gather buffers of the attention).
TP_SPLIT_ELEMENTS = 12.4
SEQUENCE_PARALLEL_FACTOR = 1.12
CONTEXT_PARALLEL_FACTOR = 1.14
# Full recompute under context parallelism keeps 14.6 elements per local token and hidden unit per layer, not
# the 1 of the layer's input (measured at CP2 over 400 to 1,200 tokens; why is not yet understood: the
# all-to-all attention inside the recomputed region is the suspect), and no separate recomputed layer.
CONTEXT_PARALLEL_FULL_RECOMPUTE_ELEMENTS = 14.6


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
    precision: str = "fp32"

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.compute_copies + self.activations

    def describe(self) -> str:
        gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
        copies = f" + bf16 compute copies {gb(self.compute_copies)}" if self.compute_copies else ""
        return (f"memory per GPU (estimate, {self.precision}): {gb(self.total)} = weights {gb(self.weights)} + "
                f"gradients {gb(self.gradients)} + optimizer {gb(self.optimizer)}{copies} + activations "
                f"{gb(self.activations)} ({self.activation_rule})")


def in_flight_layers(config: Config, micro_batches: int, layers_on_rank: int) -> float:
    """Layer activations (in whole micro-batches of one layer) the first pipeline rank holds at its peak: all
    its layers once without pipelining; under 1F1B the warm-up micro-batches, min(PP, M); interleaved (VPP
    stages), megatron's warm-up of 2 (PP - 1) + (VPP - 1) PP + 1 model-chunk micro-batches, capped at M VPP,
    each holding its chunk's layers."""
    p = config.parallel
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size or 1
    if pp == 1:
        return float(layers_on_rank)
    if vpp == 1:
        return float(layers_on_rank * min(pp, micro_batches))
    chunk_micro_batches = min(micro_batches * vpp, 2 * (pp - 1) + (vpp - 1) * pp + 1)
    return layers_on_rank / vpp * chunk_micro_batches


def longest_sequence(config: Config) -> int:
    """Tokens of the longest micro-batch sequence over all data stages: the pack budget with data.packing,
    else the largest bucket's joint sequence (text + video)."""
    from cogvx_mega.data.buckets import Bucket
    from cogvx_mega.model.transformer import sequence_length

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
    """The peak of the busiest GPU: weights, gradients and optimizer state as the trainer keeps them, and the
    activations of its in-flight micro-batches.

    * fp32 (CPU, or bf16 off): fp32 weights and gradient buffer, Adam's two fp32 moments (sharded over the
      data-parallel x context-parallel ranks with the distributed optimizer); autocast adds bf16 weight
      copies on a GPU; bf16_params: bf16 weights, fp32 gradient buffer, fp32 master weights and moments in the
      optimizer (those 12 B sharded with the distributed optimizer);
    * activations per layer and micro-batch: ACTIVATION_ELEMENTS_PER_TOKEN_HIDDEN x the rank's tokens (split
      by CP, and by TP under sequence parallel) x hidden, in the compute dtype; full recompute keeps each
      layer's input instead, plus one layer recomputed; selective recompute keeps the same as none here
      (SDPA stores no attention scores); times the in-flight micro-batches of the first pipeline rank.
    """
    from cogvx_mega.parallel.context import padded_sequence_length

    p, t, m = config.parallel, config.training, config.model
    dp = p.data_parallel_size(world_size)
    plans = plan_layout(config)
    per_rank: dict[int, int] = {}
    layers: dict[int, int] = {}
    for plan in plans:
        per_rank[plan.pipeline_rank] = per_rank.get(plan.pipeline_rank, 0) + plan.parameters_per_tp_rank
        layers[plan.pipeline_rank] = layers.get(plan.pipeline_rank, 0) + plan.num_layers
    micro_batches = t.micro_batches_per_step(dp)
    # the first rank holds the most in-flight activations, the last the head: take the larger total
    precision = t.precision()
    element = 4 if precision == "fp32" else 2
    tokens = longest_sequence(config)
    layout = SimpleNamespace(context_parallel_size=p.context_parallel_size, sequence_parallel=p.sequence_parallel,
                             tensor_model_parallel_size=p.tensor_model_parallel_size)
    split = p.context_parallel_size * (p.tensor_model_parallel_size if p.sequence_parallel else 1)
    local_tokens = padded_sequence_length(tokens, layout) // split
    micro_tokens = local_tokens * t.micro_batch_size
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    per_layer = ACTIVATION_ELEMENTS_PER_TOKEN_HIDDEN
    if tp > 1 and not p.sequence_parallel:
        per_layer = per_layer - TP_SPLIT_ELEMENTS + TP_SPLIT_ELEMENTS / tp
    elif tp > 1:
        per_layer *= SEQUENCE_PARALLEL_FACTOR
    if cp > 1:
        per_layer *= CONTEXT_PARALLEL_FACTOR
    one_layer = per_layer * micro_tokens * m.hidden_size * element
    head = HEAD_ELEMENTS_PER_TOKEN_HIDDEN * micro_tokens * m.hidden_size * element
    sharding = dp * p.context_parallel_size if p.use_distributed_optimizer else 1

    def rank_estimate(rank: int) -> MemoryEstimate:
        params = per_rank[rank]
        flight = in_flight_layers(config, micro_batches, layers[rank])
        if t.recompute == "full" and cp > 1:
            activations = flight * CONTEXT_PARALLEL_FULL_RECOMPUTE_ELEMENTS * micro_tokens * m.hidden_size * element
            activations += head
            rule = (f"full recompute under CP: {flight:g} layers in flight x "
                    f"{CONTEXT_PARALLEL_FULL_RECOMPUTE_ELEMENTS:g} x {micro_tokens:,} tokens x {m.hidden_size} x "
                    f"{element} B")
        elif t.recompute == "full":
            activations = flight * micro_tokens * m.hidden_size * element + one_layer + head
            rule = (f"full recompute: {flight:g} layer inputs in flight x {micro_tokens:,} tokens x {m.hidden_size} "
                    f"x {element} B, plus one layer recomputed")
        else:
            activations = flight * one_layer + head
            rule = (f"{flight:g} layer activations in flight x {per_layer:.3g} x "
                    f"{micro_tokens:,} tokens x {m.hidden_size} x {element} B")
        # LoRA: the adapters join the weights; gradients and optimizer state exist for them alone
        adapters = lora_parameters_per_tp_rank(config, layers[rank])
        trained = adapters if config.finetune.lora else params
        params += adapters
        if precision == "bf16_params":
            weights, gradients, optimizer, copies = 2 * params, 4 * trained, 12 * trained // sharding, 0
        else:
            weights, gradients, optimizer = 4 * params, 4 * trained, 8 * trained // sharding
            copies = 2 * params if precision == "autocast" and t.device == "cuda" else 0
        return MemoryEstimate(parameters=params, weights=weights, gradients=gradients, optimizer=optimizer,
                              compute_copies=copies, activations=int(activations), activation_rule=rule,
                              precision=precision)

    return max((rank_estimate(rank) for rank in per_rank), key=lambda estimate: estimate.total)


def lora_parameters_per_tp_rank(config: Config, num_layers: int) -> int:
    """Adapter parameters of `num_layers` layers on one tensor-parallel rank (0 without LoRA): per target,
    A [r, in] and B [out, r] with the split side divided by TP (`cogvx_mega.model.lora`)."""
    f, m = config.finetune, config.model
    if not f.lora:
        return 0
    tp, h, r = config.parallel.tensor_model_parallel_size, m.hidden_size, f.lora_rank
    ffn = m.ffn_hidden_size or 4 * h
    shapes = {"linear_qkv": (h, 3 * h, True), "linear_proj": (h, h, False), "linear_fc1": (h, ffn, True),
              "linear_fc2": (ffn, h, False)}  # (in, out, column parallel)
    per_layer = 0
    for target in f.lora_targets:
        fan_in, fan_out, column = shapes[target]
        per_layer += r * fan_in + r * fan_out // tp if column else r * fan_in // tp + r * fan_out
    return per_layer * num_layers


def measure_peak_memory(config: Config, steps: int = 2) -> int:
    """The peak bytes this rank's tensors reach while building the model and optimizer and training `steps`
    steps, from the allocator's events (torch.profiler with profile_memory: every allocation and free on the
    training device). Call inside a process group initialised for `config` (the data are made first and
    do not count)."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    from cogvx_mega.data.latent_dataset import synthetic_dataset_for
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.trainer import Trainer

    dims = initialize_parallel(config.parallel, device=config.training.device, seed=config.training.seed)
    dataset = synthetic_dataset_for(config)
    global_batch = config.check_world(dims.data_parallel_size)
    samples = config.training.micro_batch_size * config.training.micro_batches_per_step(dims.data_parallel_size)
    slots = range(dims.data_parallel_rank * samples, (dims.data_parallel_rank + 1) * samples)
    batches = [dataset.step_batch(step, slots, global_batch, config.training.seed) for step in range(steps)]
    gc.collect()  # the garbage of earlier work must not be freed inside the measurement
    activities = [ProfilerActivity.CUDA] if config.training.device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities, profile_memory=True) as profiler:
        chunks = build_model_chunks(config.model, config.parallel, device=config.training.device,
                                    seed=config.training.seed, recompute=config.training.recompute,
                                    recompute_num_layers=config.training.recompute_num_layers)
        if config.finetune.lora:  # adapters over the (random) base: the memory of a LoRA run
            from cogvx_mega.model.lora import apply_lora

            apply_lora(chunks, config.finetune, config.training.seed)
        trainer = Trainer(config, dims, chunks, dataset)
        for batch in batches:
            trainer.train_step(batch)
    device_type = "CUDA" if config.training.device == "cuda" else "CPU"
    events = sorted((e for e in profiler.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type().name == device_type), key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


# --- the layout planner (`cogvx plan`) --------------------------------------------------------------------
# Throughput figures measured on an H100 SXM (../shared/device/README.md): CogVideoX-5B GEMMs forward +
# backward, and attention at 17,776 tokens; link bandwidths per GPU (NVLink 4 through NVSwitch, 8 x 400 Gb/s
# InfiniBand per node), for the communication terms.
GEMM_TFLOPS = {"bf16": 680.0, "fp8": 960.0}
ATTENTION_TFLOPS = 450.0  # TE DotProductAttention (torch SDPA: 289)
NVLINK_BYTES_PER_S = 450e9
INTERNODE_BYTES_PER_S = 50e9


@dataclass
class LayoutPrediction:
    tp: int
    pp: int
    vpp: Optional[int]
    cp: int
    dp: int
    recompute: str
    distributed_optimizer: bool
    memory: MemoryEstimate
    step_seconds: float
    parts: dict

    @property
    def memory_uncertain(self) -> bool:
        """Full recompute under CP: the memory model is off by about 20% there (tests/distributed/
        test_planner_memory.py)."""
        return self.cp > 1 and self.recompute == "full"

    def as_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "vpp": self.vpp, "cp": self.cp, "dp": self.dp,
                "recompute": self.recompute, "distributed_optimizer": self.distributed_optimizer,
                "memory_gib": self.memory.total / 2**30, "memory_uncertain": self.memory_uncertain,
                "step_seconds": self.step_seconds,
                **{f"{name}_seconds": value for name, value in self.parts.items()}}


def predict_step_seconds(config: Config, world_size: int, gpus_per_node: int, fp8: bool,
                         parameters: int) -> tuple[float, dict]:
    """Seconds per optimizer step on a GPU layout: GEMMs and attention at the measured throughputs (full
    recompute runs the forward again; selective the attention forward), the pipeline bubble of 1F1B
    ((PP - 1) / (M x VPP) of the compute), TP/SP and CP communication per layer on NVLink (over InfiniBand
    when the group leaves the node), and the gradient all-reduce over data parallel (not overlapped)."""
    from cogvx_mega.model.flops import training_flops
    from cogvx_mega.parallel.context import padded_sequence_length

    p, t, m = config.parallel, config.training, config.model
    dp = p.data_parallel_size(world_size)
    tokens = longest_sequence(config)
    global_batch = t.global_batch(dp)
    d, layers = m.hidden_size, m.num_layers
    dense = 3.0 * layers * 24 * d * d * tokens * global_batch
    attention = training_flops(m, [tokens] * global_batch) - dense
    # a training step is 3 forwards; recompute runs the attention forward again (selective) or all of it (full)
    dense_total = dense * (4 / 3 if t.recompute == "full" else 1)
    attention_total = attention * (4 / 3 if t.recompute in ("full", "selective") else 1)
    compute = (dense_total / (GEMM_TFLOPS["fp8" if fp8 else "bf16"] * 1e12)
               + attention_total / (ATTENTION_TFLOPS * 1e12)) / world_size
    micro_batches = t.micro_batches_per_step(dp)
    vpp = p.virtual_pipeline_model_parallel_size or 1
    bubble = compute * (p.pipeline_model_parallel_size - 1) / (micro_batches * vpp)
    layout = SimpleNamespace(context_parallel_size=p.context_parallel_size, sequence_parallel=p.sequence_parallel,
                             tensor_model_parallel_size=p.tensor_model_parallel_size)
    cp_tokens = padded_sequence_length(tokens, layout) // p.context_parallel_size
    samples_per_gpu_pass = t.micro_batch_size * micro_batches  # per model replica
    layers_per_stage = layers / p.pipeline_model_parallel_size
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size

    def bandwidth(group_span: int) -> float:
        return NVLINK_BYTES_PER_S if group_span <= gpus_per_node else INTERNODE_BYTES_PER_S

    # TP (+SP): 2 all-gathers and 2 reduce-scatters of [s, b, h] bf16 forward, as many backward (+1 forward
    # again under full recompute)
    passes = 3 if t.recompute == "full" else 2
    tp_bytes = (tp - 1) / tp * 4 * passes * cp_tokens * d * 2 * layers_per_stage * samples_per_gpu_pass
    tp_time = tp_bytes / bandwidth(tp) if tp > 1 else 0.0
    # CP (all-to-all attention): q, k, v and the output each exchanged forward, twice that backward
    cp_bytes = (cp - 1) / cp * 4 * (passes + 1) * cp_tokens * d * 2 / tp * layers_per_stage * samples_per_gpu_pass
    cp_time = cp_bytes / bandwidth(tp * cp) if cp > 1 else 0.0
    dp_ranks = dp * cp
    dp_time = (2 * (dp_ranks - 1) / dp_ranks * parameters * 4 / bandwidth(world_size)) if dp_ranks > 1 else 0.0
    parts = {"compute": compute, "bubble": bubble, "tp_comm": tp_time, "cp_comm": cp_time, "dp_comm": dp_time}
    return sum(parts.values()), parts


def plan_layouts(config: Config, gpus: int, gpu_mem_gib: float, gpus_per_node: int = 8, fp8: bool = False,
                 headroom: float = 0.9) -> tuple[list[LayoutPrediction], int]:
    """Every TP/PP/VPP/CP/DP/recompute/distributed-optimizer layout of `gpus` that fits `headroom` of the
    memory, fastest first; and how many layouts were considered."""
    import dataclasses

    m = config.model
    considered, fitting = 0, []
    gpus_per_node = min(gpus_per_node, gpus)
    for tp in (1, 2, 4, 8):
        if tp > gpus_per_node or m.num_attention_heads % tp or gpus % tp:
            continue
        for cp in (1, 2, 4, 8):
            for pp in [n for n in range(1, m.num_layers + 1) if m.num_layers % n == 0]:
                if gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                for vpp in ([None] + ([2] if pp > 1 and m.num_layers % (2 * pp) == 0 else [])):
                    for recompute in ("none", "selective", "full"):
                        for distributed in ((False, True) if dp * cp > 1 else (False,)):
                            parallel = dataclasses.replace(
                                config.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
                                sequence_parallel=tp > 1, use_distributed_optimizer=distributed)
                            training = dataclasses.replace(config.training, recompute=recompute)
                            candidate = dataclasses.replace(config, parallel=parallel, training=training)
                            try:
                                candidate.validate()
                                candidate.check_world(dp)
                            except ConfigError:
                                continue
                            considered += 1
                            memory = estimate_memory(candidate, gpus)
                            if memory.total > headroom * gpu_mem_gib * 2**30:
                                continue
                            seconds, parts = predict_step_seconds(candidate, gpus, gpus_per_node, fp8,
                                                                  memory.parameters)
                            fitting.append(LayoutPrediction(tp, pp, vpp, cp, dp, recompute, distributed, memory,
                                                            seconds, parts))
    fitting.sort(key=lambda p: (p.step_seconds, p.memory.total))
    return fitting, considered


def describe_plans(plans: list[LayoutPrediction], considered: int, limit: int = 20) -> str:
    lines = [f"{len(plans)} of {considered} layouts fit; fastest first (predicted):",
             f"{'TP':>3} {'PP':>3} {'VPP':>4} {'CP':>3} {'DP':>4} {'recompute':>10} {'dist-opt':>8} "
             f"{'memory GiB':>10} {'step s':>8}  compute / bubble / TP / CP / DP comm s"]
    for plan in plans[:limit]:
        parts = plan.parts
        lines.append(f"{plan.tp:3} {plan.pp:3} {plan.vpp or '-':>4} {plan.cp:3} {plan.dp:4} {plan.recompute:>10} "
                     f"{'yes' if plan.distributed_optimizer else 'no':>8} {plan.memory.total / 2**30:10.1f} "
                     f"{plan.step_seconds:8.2f}  {parts['compute']:.2f} / {parts['bubble']:.2f} / "
                     f"{parts['tp_comm']:.2f} / {parts['cp_comm']:.2f} / {parts['dp_comm']:.2f}"
                     + ("  (memory +-25%: CP with full recompute)" if plan.memory_uncertain else ""))
    return "\n".join(lines)
