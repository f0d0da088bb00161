"""Typed configuration: one dataclass per concern, validated once at start-up.

Every user-facing error is a `ConfigError` that names the field, the bad value and the fix.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

POSITIONAL_EMBEDDINGS = ("sincos", "rope", "rope+learned")
BACKENDS = ("local", "te")
STAGE_FIELDS = {"buckets", "source", "pack_tokens", "num_frames", "height", "width"}
ROPE_IMPLS = ("auto", "torch", "triton", "te")
ADALN_IMPLS = ("torch", "triton")
# ModelConfig fields that choose how the model runs, not what its weights are: a checkpoint loads and resumes
# with any value of them (`from_pretrained(..., **overrides)`, `--resume`).
RUNTIME_MODEL_FIELDS = ("backend", "rope_impl", "adaln_impl", "packed_attention", "fp8", "fp8_recipe",
                        "fp8_bf16_edge_layers", "fp8_amax_history_len")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise", "mxfp8": "mxfp8"}  # ours -> megatron's names
FP8_ALIGNMENT = 16  # TE's FP8 GEMMs take token counts divisible by 16
PACKED_ATTENTION_KERNELS = ("per_clip", "sdpa_mask", "flex", "flash")  # = parallel.varlen.VARLEN_KERNELS
TIMESTEP_SAMPLING = ("explicit_uniform", "uniform")


class ConfigError(ValueError):
    """A configuration value a user can fix. Its message names the field and the fix."""

    def __init__(self, field_name: str, value, fix: str):
        self.field_name = field_name
        self.value = value
        self.fix = fix
        super().__init__(f"{field_name}={value!r}: {fix}")


@dataclass
class ModelConfig:
    """The CogVideoX expert transformer (REFERENCE §1-3). Field names follow diffusers where one exists."""

    num_layers: int = 30
    """Transformer blocks."""
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    """Latent channels in (32 for image-to-video: noisy latent ‖ image latent)."""
    out_channels: int = 16
    time_embed_dim: int = 512
    """Width of the timestep embedding that drives every modulation."""
    ofs_embed_dim: Optional[int] = None
    """CogVideoX1.5-I2V's `ofs` embedding width (None: no ofs input)."""
    text_embed_dim: int = 4096
    """Width of the text encoder features (T5-XXL: 4096)."""
    max_text_seq_length: int = 226
    """Text tokens per sample (T5 padded/truncated to this length)."""
    ffn_hidden_size: Optional[int] = None
    """FFN inner width; None means 4 x hidden."""
    patch_size: int = 2
    patch_size_t: Optional[int] = None
    """Temporal patch (CogVideoX 1.5: 2, Linear patch embedding). None: Conv2d per frame."""
    patch_bias: bool = True
    """Bias of the Conv2d patch embedding (1.0 models)."""
    sample_frames: int = 49
    """Pixel frames of the training resolution (positions are built for it)."""
    sample_height: int = 60
    """Latent height of the training resolution."""
    sample_width: int = 90
    """Latent width of the training resolution."""
    temporal_compression_ratio: int = 4
    positional_embedding: str = "sincos"
    """'sincos' (2B), 'rope' (5B, 1.5) or 'rope+learned' (5B-I2V)."""
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-6
    backend: str = "local"
    """'local' (pure torch, any device) or 'te' (Transformer Engine, GPU)."""
    rope_impl: str = "auto"
    """Who applies the 3D RoPE to q and k: 'torch' (reference), 'triton' (one-launch kernel, forward and
    backward), 'te' (Transformer Engine's fused RoPE, CUDA) or 'auto' (triton on CUDA, torch elsewhere)."""
    adaln_impl: str = "torch"
    """Expert AdaLN: 'torch' (LayerNorm, then the token's shift/scale/gate as [s, b, h] tensors) or 'triton'
    (LayerNorm + shift/scale in one kernel and the gated residual add in another, forward and backward)."""
    fp8: Optional[str] = None
    """FP8 through Transformer Engine (model.backend=te, CUDA): None (bf16), 'hybrid' (e4m3 forward, e5m2
    gradients) or 'e4m3'. Weights stay fp32 masters and checkpoints keep their format: an FP8 run resumes in
    bf16 and back."""
    fp8_recipe: str = "delayed"
    """'delayed' (scales from an amax history), 'current' (per-tensor scales of the current step) or 'mxfp8'
    (block scales; Blackwell GPUs)."""
    fp8_bf16_edge_layers: int = 0
    """Keep this many layers at each end of every pipeline stage in bf16 (not with the delayed recipe)."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: steps of amax history the scale is taken from (the max over them)."""
    packed_attention: str = "per_clip"
    """Kernel of the block-diagonal attention over packed sequences on the local backend: 'per_clip',
    'sdpa_mask', 'flex' or 'flash' (flash-attn, CUDA). The te backend uses TE's thd attention."""
    latent_scale: float = 1.15258426
    """VAE latent scaling factor of this family (2B: 1.15258426, 5B and later: 0.7)."""

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def validate_fp8(self) -> None:
        if self.fp8 is None:
            return
        if self.fp8 not in FP8_FORMATS:
            raise ConfigError("model.fp8", self.fp8, f"choose one of {', '.join(FP8_FORMATS)}, or null for bf16")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError("model.fp8_recipe", self.fp8_recipe, f"choose one of {', '.join(FP8_RECIPES)}")
        if self.backend != "te":
            raise ConfigError("model.fp8", self.fp8, "FP8 runs through Transformer Engine's layers: set "
                                                     "model.backend=te (CUDA), or model.fp8=null on the local backend")
        if self.fp8_bf16_edge_layers < 0 or isinstance(self.fp8_bf16_edge_layers, bool):
            raise ConfigError("model.fp8_bf16_edge_layers", self.fp8_bf16_edge_layers, "use 0 or more layers")
        if self.fp8_bf16_edge_layers and self.fp8_recipe == "delayed":
            raise ConfigError("model.fp8_bf16_edge_layers", self.fp8_bf16_edge_layers,
                              "bf16 edge layers need per-step scales: use model.fp8_recipe=current or mxfp8, or 0")
        if self.fp8_amax_history_len < 1:
            raise ConfigError("model.fp8_amax_history_len", self.fp8_amax_history_len, "use 1 or more steps")

    @property
    def uses_rope(self) -> bool:
        return self.positional_embedding in ("rope", "rope+learned")

    def validate(self) -> None:
        require_positive_integers(self, "model", ("num_layers", "num_attention_heads", "attention_head_dim",
                                                  "in_channels", "out_channels", "time_embed_dim", "text_embed_dim",
                                                  "max_text_seq_length", "patch_size", "sample_height",
                                                  "sample_width"))
        if self.in_channels not in (self.out_channels, 2 * self.out_channels):
            raise ConfigError("model.in_channels", self.in_channels,
                              f"use out_channels={self.out_channels} (text-to-video) or twice that (image-to-video: "
                              f"noisy latents and the image latent)")
        if self.positional_embedding not in POSITIONAL_EMBEDDINGS:
            raise ConfigError("model.positional_embedding", self.positional_embedding,
                              f"choose one of {', '.join(POSITIONAL_EMBEDDINGS)}")
        if self.backend not in BACKENDS:
            raise ConfigError("model.backend", self.backend, f"choose one of {', '.join(BACKENDS)}")
        self.validate_fp8()
        if self.adaln_impl not in ADALN_IMPLS:
            raise ConfigError("model.adaln_impl", self.adaln_impl, f"choose one of {', '.join(ADALN_IMPLS)}")
        if self.rope_impl not in ROPE_IMPLS:
            raise ConfigError("model.rope_impl", self.rope_impl, f"choose one of {', '.join(ROPE_IMPLS)}")
        if self.packed_attention not in PACKED_ATTENTION_KERNELS:
            raise ConfigError("model.packed_attention", self.packed_attention,
                              f"choose one of {', '.join(PACKED_ATTENTION_KERNELS)}")
        if self.uses_rope and self.attention_head_dim % 8:
            raise ConfigError("model.attention_head_dim", self.attention_head_dim,
                              "3D RoPE splits a head 2/8 (t) + 3/8 (h) + 3/8 (w): use a multiple of 8")
        if not self.uses_rope and self.hidden_size % 16:
            raise ConfigError("model.num_attention_heads", self.num_attention_heads,
                              f"3D sin-cos positions need hidden size divisible by 16 (is {self.hidden_size})")
        if self.patch_size_t is not None and self.patch_size_t < 1:
            raise ConfigError("model.patch_size_t", self.patch_size_t, "use None (Conv2d patches) or a positive integer")
        if self.ofs_embed_dim is not None and self.ofs_embed_dim != self.time_embed_dim:
            raise ConfigError("model.ofs_embed_dim", self.ofs_embed_dim,
                              f"the ofs embedding is added to the timestep embedding: set it to time_embed_dim "
                              f"({self.time_embed_dim})")
        for name in ("sample_height", "sample_width"):
            if getattr(self, name) % self.patch_size:
                raise ConfigError(f"model.{name}", getattr(self, name),
                                  f"must be a multiple of model.patch_size={self.patch_size}")
        check_frame_count("model.sample_frames", self.sample_frames, self.temporal_compression_ratio)


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallel is whatever remains of the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    context_parallel_attention: str = "a2a"
    """How attention spans the CP group: 'a2a' (Ulysses all-to-all over heads) or 'all_gather' (K/V gathered;
    any head count) on the local backend; 'p2p', 'all_gather', 'a2a' or 'a2a+p2p' with Transformer Engine."""
    hierarchical_context_parallel_sizes: Optional[list[int]] = None
    """For 'a2a+p2p': [a2a size, p2p size] with a product equal to context_parallel_size (e.g. [8, 2]: a2a
    inside a node, p2p between nodes)."""
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    """Shard the optimizer state (and fp32 master weights) over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: overlap the parameter all-gather with the next forward pass."""
    ddp_bucket_size: Optional[int] = None
    """Parameters per gradient-reduction bucket with overlap_grad_reduce (megatron's --ddp-bucket-size;
    None: megatron's default, max(40M, 1M x DP))."""
    num_layers_in_first_pipeline_stage: Optional[int] = None
    """Uneven pipeline split: layers on the first stage (the rest are spread evenly)."""
    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Uneven pipeline split: layers on the last stage."""

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def validate(self, model: ModelConfig) -> None:
        require_positive_integers(self, "parallel", ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                                     "context_parallel_size"))
        tp = self.tensor_model_parallel_size
        if model.num_attention_heads % tp:
            raise ConfigError("parallel.tensor_model_parallel_size", tp,
                              f"model.num_attention_heads={model.num_attention_heads} is not divisible by it; "
                              f"choose a divisor of the head count")
        cp = self.context_parallel_size
        kinds = ("a2a", "all_gather") if model.backend == "local" else ("p2p", "all_gather", "a2a", "a2a+p2p")
        if self.context_parallel_attention not in kinds:
            raise ConfigError("parallel.context_parallel_attention", self.context_parallel_attention,
                              f"the {model.backend} backend offers {', '.join(kinds)}")
        if cp > 1 and self.context_parallel_attention == "a2a" and (model.num_attention_heads // tp) % cp:
            raise ConfigError("parallel.context_parallel_size", cp,
                              f"Ulysses (a2a) splits the {model.num_attention_heads // tp} heads of each TP rank over "
                              f"CP: use a CP size dividing them, or parallel.context_parallel_attention=all_gather")
        hierarchy = self.hierarchical_context_parallel_sizes
        if cp > 1 and self.context_parallel_attention == "a2a+p2p":
            if (not isinstance(hierarchy, list) or len(hierarchy) != 2
                    or not all(isinstance(n, int) and n > 0 for n in hierarchy) or hierarchy[0] * hierarchy[1] != cp):
                raise ConfigError("parallel.hierarchical_context_parallel_sizes", hierarchy,
                                  f"a2a+p2p needs [a2a size, p2p size] with product context_parallel_size={cp}, "
                                  f"e.g. [{cp // 2 if cp % 2 == 0 else 1}, {2 if cp % 2 == 0 else cp}]")
            if (model.num_attention_heads // tp) % hierarchy[0]:
                raise ConfigError("parallel.hierarchical_context_parallel_sizes", hierarchy,
                                  f"the a2a level splits the {model.num_attention_heads // tp} heads of each TP rank: "
                                  f"its size {hierarchy[0]} must divide them")
        elif hierarchy is not None:
            raise ConfigError("parallel.hierarchical_context_parallel_sizes", hierarchy,
                              "only parallel.context_parallel_attention=a2a+p2p with CP > 1 uses it; remove it")
        if self.sequence_parallel and tp == 1:
            raise ConfigError("parallel.sequence_parallel", True, "sequence parallel needs tensor_model_parallel_size > 1")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            if vpp < 1 or self.pipeline_model_parallel_size == 1:
                raise ConfigError("parallel.virtual_pipeline_model_parallel_size", vpp,
                                  "virtual stages need pipeline_model_parallel_size > 1 and a positive count")
        if self.ddp_bucket_size is not None and (self.ddp_bucket_size < 1 or not self.overlap_grad_reduce):
            raise ConfigError("parallel.ddp_bucket_size", self.ddp_bucket_size,
                              "buckets exist only with parallel.overlap_grad_reduce=true; use a positive size")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError("parallel.overlap_param_gather", True, "needs parallel.use_distributed_optimizer=true")
        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        if first is not None or last is not None:
            pp = self.pipeline_model_parallel_size
            middle_stages = pp - (first is not None) - (last is not None)
            rest = model.num_layers - (first or 0) - (last or 0)
            if pp == 1 or rest < 0 or (middle_stages and rest % (middle_stages * (vpp or 1))) or \
                    (not middle_stages and rest):
                raise ConfigError("parallel.num_layers_in_first_pipeline_stage", first,
                                  f"with last={last}, the {model.num_layers} layers do not split over {pp} stages "
                                  f"(the middle stages share the rest evenly)")
            return
        stages = self.pipeline_model_parallel_size * (vpp or 1)
        if model.num_layers % stages:
            raise ConfigError("parallel.pipeline_model_parallel_size", self.pipeline_model_parallel_size,
                              f"model.num_layers={model.num_layers} does not split into {stages} pipeline stages")

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel size for a world size; a clear error if the layout does not factor it."""
        mp = self.model_parallel_size
        if world_size % mp:
            raise ConfigError(
                "parallel", f"TP{self.tensor_model_parallel_size}xPP{self.pipeline_model_parallel_size}"
                f"xCP{self.context_parallel_size}",
                f"world size {world_size} is not divisible by TPxPPxCP={mp}; launch a multiple of {mp} processes")
        return world_size // mp


@dataclass
class DiffusionConfig:
    """Training objective (REFERENCE §5)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift_scale: float = 3.0
    zero_terminal_snr: bool = True
    timestep_sampling: str = "explicit_uniform"
    """'explicit_uniform': data-parallel rank r draws from its own interval; 'uniform': all of 0..T-1."""
    text_dropout: float = 0.1
    """Fraction of samples whose text embedding is replaced by zeros."""
    image_noise_log_sigma_mean: float = -3.0
    image_noise_log_sigma_std: float = 0.5
    """Image-to-video: the first frame gets pixel noise of level sigma = exp(N(mean, std)) before it is encoded
    (SAT's augmentation: mean -3, std 0.5, sigma ~ 0.05)."""
    image_dropout: float = 0.05
    """Image-to-video: fraction of samples trained without the image (all-zero conditioning; SAT's
    noised_image_dropout)."""
    ofs: float = 2.0
    """The 1.5-I2V model's ofs input in training (the pipelines use 2.0 at inference)."""

    def validate(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ConfigError("diffusion.timestep_sampling", self.timestep_sampling,
                              f"choose one of {', '.join(TIMESTEP_SAMPLING)}")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ConfigError("diffusion.text_dropout", self.text_dropout, "use a fraction in [0, 1)")
        if not 0.0 <= self.image_dropout < 1.0:
            raise ConfigError("diffusion.image_dropout", self.image_dropout, "use a fraction in [0, 1)")
        if not self.image_noise_log_sigma_std >= 0:
            raise ConfigError("diffusion.image_noise_log_sigma_std", self.image_noise_log_sigma_std, "use 0 or more")
        if self.snr_shift_scale <= 0:
            raise ConfigError("diffusion.snr_shift_scale", self.snr_shift_scale, "must be positive")
        if self.num_train_timesteps < 2:
            raise ConfigError("diffusion.num_train_timesteps", self.num_train_timesteps, "use at least 2")


@dataclass
class DataConfig:
    """Training clips. Sizes are in pixels; the latent grid follows from the VAE compression (4x time, 8x space)."""

    source: str = "synthetic"
    """'synthetic' (generated moving shapes), a latent cache (`cogvx data encode`), a folder of latents from
    `cogvx vae encode`, or a manifest (.jsonl from `cogvx data scan`) for online mode: clips decoded and
    encoded on the fly with `vae` and `text_encoder`, the same batches the cache of that manifest gives."""
    num_frames: int = 49
    height: int = 480
    width: int = 720
    spatial_compression_ratio: int = 8
    num_synthetic_clips: int = 64
    num_workers: int = 4
    """Background threads decoding clips ahead of use (`cogvx data encode`, online mode); 0: decode in the
    calling thread."""
    vae: Optional[str] = None
    """Online mode: the VAE folder (diffusers or cogvx-mega) that encodes the clips."""
    text_encoder: Optional[str] = None
    """Online mode: the local T5 folder (tokenizer and encoder, or a pipeline folder) for the captions."""
    online_keep_clips: int = 256
    """Online mode: encoded clips kept in memory (least recently used dropped) for reuse in later epochs;
    0 encodes every clip at every use."""
    fps: float = 8.0
    """Frame rate clips are sampled at when decoding real videos (CogVideoX: 8)."""
    buckets: Optional[list[str]] = None
    """Resolution/duration buckets as FRAMESxHEIGHTxWIDTH (pixels), e.g. [49x480x720, 49x720x480, 1x480x720];
    None: one bucket of num_frames x height x width."""

    packing: bool = False
    """Pack clips of different sizes and durations into sequences of at most `pack_tokens` tokens (each clip
    with its own timestep, attention kept inside the clip); training.global_batch_size then counts packs and
    a micro-batch is one pack."""
    pack_tokens: Optional[int] = None
    """Token budget of a pack, text tokens included (with data.packing; at least the longest clip)."""
    pack_window: int = 4096
    """Clips packed together best-fit-decreasing (a larger window packs tighter)."""
    stages: Optional[list] = None
    """Progressive training: a list of stages, each {until_step: N (absent on the last), and any of buckets,
    source, pack_tokens, num_frames, height, width}, overriding these data fields from the previous stage's
    end until step N. Each stage starts its own data order at its first step."""

    def bucket_names(self) -> list[str]:
        return list(self.buckets) if self.buckets else [f"{self.num_frames}x{self.height}x{self.width}"]

    def stage_configs(self) -> list[tuple[int, Optional[int], "DataConfig"]]:
        """[(first step, end step or None, the data config of the stage)]: one entry without stages."""
        if not self.stages:
            return [(0, None, self)]
        out, start = [], 0
        for index, stage in enumerate(self.stages):
            name = f"data.stages[{index}]"
            if not isinstance(stage, dict):
                raise ConfigError(name, stage, "write a stage as a mapping, e.g. {until_step: 1000, buckets: [...]}")
            unknown = set(stage) - STAGE_FIELDS - {"until_step"}
            if unknown:
                raise ConfigError(name, stage, f"unknown stage fields {sorted(unknown)}; a stage sets until_step and "
                                               f"any of {', '.join(sorted(STAGE_FIELDS))}")
            end = stage.get("until_step")
            last = index == len(self.stages) - 1
            if end is None and not last:
                raise ConfigError(f"{name}.until_step", None, "every stage but the last needs until_step")
            if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end <= start):
                raise ConfigError(f"{name}.until_step", end, f"use an integer step after the stage's start ({start})")
            values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
            values.update({k: v for k, v in stage.items() if k != "until_step"})
            values["stages"] = None
            config = DataConfig(**values)
            out.append((start, end, config))
            start = end
        return out

    def latent_shape(self, model: ModelConfig) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width)."""
        return ((self.num_frames - 1) // model.temporal_compression_ratio + 1,
                self.height // self.spatial_compression_ratio, self.width // self.spatial_compression_ratio)

    def validate(self, model: ModelConfig) -> None:
        check_frame_count("data.num_frames", self.num_frames, model.temporal_compression_ratio)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % self.spatial_compression_ratio:
                raise ConfigError(f"data.{name}", value,
                                  f"must be a multiple of the VAE's spatial compression {self.spatial_compression_ratio}")
            latent = value // self.spatial_compression_ratio
            if latent % model.patch_size:
                raise ConfigError(f"data.{name}", value,
                                  f"the latent {name} {latent} is not divisible by model.patch_size={model.patch_size}; "
                                  f"use a multiple of {self.spatial_compression_ratio * model.patch_size}")
        latent_frames = self.latent_shape(model)[0]
        if model.patch_size_t and latent_frames % model.patch_size_t:
            raise ConfigError("data.num_frames", self.num_frames,
                              f"gives {latent_frames} latent frames, not divisible by model.patch_size_t="
                              f"{model.patch_size_t}; use 1+4k frames with (1+k) a multiple of {model.patch_size_t}")
        if model.positional_embedding == "rope+learned" and (
                self.height // self.spatial_compression_ratio, self.width // self.spatial_compression_ratio) != (
                model.sample_height, model.sample_width):
            raise ConfigError("data.height", self.height,
                              "learned positions exist only for the model's sample resolution: use "
                              f"{model.sample_height * self.spatial_compression_ratio}x"
                              f"{model.sample_width * self.spatial_compression_ratio}")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers", self.num_workers, "use 0 (decode in the calling thread) or more")
        if self.online_keep_clips < 0:
            raise ConfigError("data.online_keep_clips", self.online_keep_clips, "use 0 (keep none) or more")
        if self.packing and (self.pack_tokens is None or isinstance(self.pack_tokens, bool)
                             or not isinstance(self.pack_tokens, int) or self.pack_tokens < 1):
            raise ConfigError("data.pack_tokens", self.pack_tokens, "data.packing=true needs a positive token budget "
                                                                    "per pack (text tokens included)")
        if self.pack_window < 1:
            raise ConfigError("data.pack_window", self.pack_window, "use 1 or more clips")
        if self.stages is not None and not isinstance(self.stages, list):
            raise ConfigError("data.stages", self.stages, "use a list of stages")
        if self.stages:
            for _, _, stage in self.stage_configs():
                stage.validate(model)
        if self.num_synthetic_clips < 1:
            raise ConfigError("data.num_synthetic_clips", self.num_synthetic_clips, "use at least 1")
        if not self.fps > 0:
            raise ConfigError("data.fps", self.fps, "use a positive frame rate")
        for bucket in self.buckets or []:
            parts = str(bucket).lower().split("x")
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                raise ConfigError("data.buckets", bucket, "write a bucket as FRAMESxHEIGHTxWIDTH, e.g. 49x480x720")
            frames, height, width = map(int, parts)
            check_frame_count("data.buckets", frames, model.temporal_compression_ratio)
            unit = self.spatial_compression_ratio * model.patch_size
            if height % unit or width % unit:
                raise ConfigError("data.buckets", bucket, f"height and width must be multiples of {unit} (VAE "
                                                          f"compression x patch size)")


@dataclass
class TrainingConfig:
    """Optimisation and bookkeeping."""

    steps: int = 1000
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all data-parallel ranks; a multiple of micro_batch_size x DP (the
    quotient is the number of accumulated micro-batches). None: micro_batch_size x DP."""
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 1234
    device: str = "cuda"
    bf16: bool = True
    """Train in bf16 (see mixed_precision); false: fp32 everywhere."""
    mixed_precision: str = "auto"
    """How bf16 trains: 'bf16_params' (megatron's mixed precision: bf16 weights and compute, fp32 main
    gradients, fp32 master weights in the optimizer), 'autocast' (fp32 weights under bf16 autocast) or 'auto'
    (bf16_params on CUDA; CPU runs in fp32)."""
    recompute: str = "none"
    """Activation recomputation: 'none', 'selective' (attention core) or 'full' (whole layers)."""
    recompute_num_layers: int = 1
    """With recompute=full: layers per recomputed group (megatron's uniform method)."""
    log_interval: int = 1
    save_interval: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    async_save: bool = False
    """Write checkpoints in a background process (megatron's async torch_dist save): training goes on
    while the shards are written; the checkpoint is renamed into place when every rank has finished."""
    run_dir: str = "runs/default"
    sample_every: int = 0
    """Write sample videos every N steps (0: never), as the `sampling` section says."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run_dir>/tensorboard (every metric of metrics.jsonl)."""
    peak_tflops: Optional[float] = None
    """The per-GPU peak MFU is measured against; default: the device's dense bf16 datasheet peak (x2 with FP8)."""
    loss_spike_factor: Optional[float] = None
    """Skip a step whose loss exceeds this factor times the mean of the last loss_spike_window accepted losses
    (None: skip only non-finite losses, which are always skipped)."""
    loss_spike_window: int = 20
    max_skipped_steps: int = 5
    """Stop the run (after a checkpoint of the last good weights) when this many steps in a row were skipped."""
    stop_file: Optional[str] = None
    """When this file appears, every rank stops at the next step boundary after a checkpoint (the SLURM
    launcher's requeue uses it); the file is removed."""

    def precision(self) -> str:
        """What the run does: 'fp32', 'autocast' or 'bf16_params' (from bf16, mixed_precision and device)."""
        if not self.bf16:
            return "fp32"
        if self.mixed_precision == "auto":
            return "bf16_params" if self.device == "cuda" else "fp32"
        return self.mixed_precision

    def global_batch(self, data_parallel_size: int) -> int:
        """Samples per optimizer step over all data-parallel ranks (the global sample slots of a step)."""
        return self.micro_batch_size * data_parallel_size * self.micro_batches_per_step(data_parallel_size)

    def micro_batches_per_step(self, data_parallel_size: int) -> int:
        per_pass = self.micro_batch_size * data_parallel_size
        if self.global_batch_size is None:
            return 1
        if self.global_batch_size % per_pass:
            raise ConfigError("training.global_batch_size", self.global_batch_size,
                              f"must be a multiple of micro_batch_size x data-parallel size = {per_pass}")
        return self.global_batch_size // per_pass

    def validate(self) -> None:
        require_positive_integers(self, "training", ("steps", "micro_batch_size", "recompute_num_layers"))
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError("training.recompute", self.recompute, "choose none, selective or full")
        if self.mixed_precision not in ("auto", "bf16_params", "autocast"):
            raise ConfigError("training.mixed_precision", self.mixed_precision, "choose auto, bf16_params or autocast")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError("training.global_batch_size", self.global_batch_size, "must be positive (or null)")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError("training.device", self.device, "use 'cpu' or 'cuda'")
        if self.lr <= 0:
            raise ConfigError("training.lr", self.lr, "must be positive")
        if self.warmup_steps < 0:
            raise ConfigError("training.warmup_steps", self.warmup_steps, "must be >= 0")
        if self.keep_checkpoints < 1:
            raise ConfigError("training.keep_checkpoints", self.keep_checkpoints, "keep at least 1")
        require_positive_integers(self, "training", ("loss_spike_window", "max_skipped_steps"))
        if self.loss_spike_factor is not None and not self.loss_spike_factor > 1:
            raise ConfigError("training.loss_spike_factor", self.loss_spike_factor, "use a factor above 1 (e.g. 3.0), "
                                                                                   "or null")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError("training.peak_tflops", self.peak_tflops, "use the per-GPU peak in TFLOP/s, or null")
        if isinstance(self.sample_every, bool) or not isinstance(self.sample_every, int) or self.sample_every < 0:
            raise ConfigError("training.sample_every", self.sample_every, "use a number of steps (0: no samples)")


@dataclass
class SamplingConfig:
    """The videos a run writes every training.sample_every steps (`cogvx sample`'s settings)."""

    prompts: Optional[list[str]] = None
    """Prompt texts, encoded once with text_encoder (or data.text_encoder)."""
    prompt_embeds: Optional[str] = None
    """Or a safetensors file with prompt_embeds [N, L, D] (as `cogvx sample --prompt-embeds`)."""
    negative_prompt_embeds: Optional[str] = None
    """A safetensors file with negative_prompt_embeds [N, L, D]; default: T5("") with prompts, zeros with
    prompt_embeds (SAT's unconditional branch)."""
    images: Optional[list[str]] = None
    """Image-to-video models: one image file per prompt, the first frame."""
    text_encoder: Optional[str] = None
    """The local T5 folder for prompts (default data.text_encoder)."""
    vae: Optional[str] = None
    """The VAE folder that decodes the samples (default data.vae)."""
    steps: int = 50
    scheduler: str = "dpm"
    guidance_scale: float = 6.0
    dynamic_cfg: bool = False
    seed: int = 42
    """Every prompt is drawn from this seed: sample k equals `cogvx sample --seed` of the step's weights."""
    num_frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    """The sample resolution; default: the data's (the last stage's with data.stages)."""
    fps: float = 8.0
    chunk_frames: Optional[int] = None
    """Decode this many latent frames at a time (without context parallelism); default: the whole clip."""
    save_latents: bool = False
    """Also write each sample's final latents (before the VAE) beside its MP4."""

    def validate(self, model: ModelConfig, training: "TrainingConfig", data: "DataConfig") -> None:
        require_positive_integers(self, "sampling", ("steps",))
        if self.scheduler not in ("ddim", "dpm"):
            raise ConfigError("sampling.scheduler", self.scheduler, "choose ddim or dpm")
        if self.num_frames is not None:
            check_frame_count("sampling.num_frames", self.num_frames, model.temporal_compression_ratio)
        unit = data.spatial_compression_ratio * model.patch_size
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < unit or value % unit):
                raise ConfigError(f"sampling.{name}", value, f"use a positive multiple of {unit} pixels")
        if self.prompts is not None and (not isinstance(self.prompts, list) or not self.prompts):
            raise ConfigError("sampling.prompts", self.prompts, "use a list of prompt texts")
        if not training.sample_every:
            return
        if not self.prompts and not self.prompt_embeds:
            raise ConfigError("training.sample_every", training.sample_every,
                              "needs sampling.prompts (with sampling.text_encoder or data.text_encoder) or "
                              "sampling.prompt_embeds (a safetensors file)")
        if self.prompts and self.prompt_embeds:
            raise ConfigError("sampling.prompt_embeds", self.prompt_embeds, "give sampling.prompts or "
                                                                            "sampling.prompt_embeds, not both")
        if self.prompts and not (self.text_encoder or data.text_encoder):
            raise ConfigError("sampling.prompts", self.prompts, "needs sampling.text_encoder (a local T5 folder) "
                                                                "or data.text_encoder; or use sampling.prompt_embeds")
        if not (self.vae or data.vae):
            raise ConfigError("training.sample_every", training.sample_every,
                              "needs sampling.vae (the VAE folder that decodes the samples) or data.vae")
        if model.in_channels != model.out_channels and not self.images:
            raise ConfigError("sampling.images", self.images, "an image-to-video model samples from images: give "
                                                              "one image file per prompt")


LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
"""The linears LoRA can adapt: attention QKV and out (diffusers: attn1.to_q/to_k/to_v, attn1.to_out.0), FFN in and
out (ff.net.0.proj, ff.net.2)."""


@dataclass
class FinetuneConfig:
    """LoRA fine-tuning (`finetune.lora_rank=R`): rank-R adapters on the transformer's linears, the base weights
    frozen (no gradients, no optimizer state). The base weights come from --init-from."""

    lora_rank: Optional[int] = None
    """None: no LoRA (the whole model trains)."""
    lora_alpha: Optional[float] = None
    """The adapters' scale is lora_alpha / lora_rank (PEFT's convention); None: lora_alpha = lora_rank."""
    lora_targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    lora_dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""

    @property
    def lora(self) -> bool:
        return self.lora_rank is not None

    @property
    def lora_scale(self) -> float:
        return (self.lora_alpha if self.lora_alpha is not None else self.lora_rank) / self.lora_rank

    def validate(self) -> None:
        if self.lora_rank is None:
            return
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ConfigError("finetune.lora_rank", self.lora_rank, "use a positive integer rank (e.g. 64), or null")
        targets = self.lora_targets
        if not isinstance(targets, list) or not targets:
            raise ConfigError("finetune.lora_targets", targets, f"use a list of {', '.join(LORA_TARGETS)}")
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or len(set(targets)) != len(targets):
            raise ConfigError("finetune.lora_targets", targets, f"{unknown or 'a repeated name'} is not a LoRA target "
                                                                f"of this model; choose from {', '.join(LORA_TARGETS)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError("finetune.lora_dropout", self.lora_dropout, "use a fraction in [0, 1)")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError("finetune.lora_alpha", self.lora_alpha, "use a positive number, or null (= lora_rank)")

    def as_meta(self) -> Optional[dict]:
        """What a LoRA checkpoint records of its adapters (None without LoRA)."""
        if not self.lora:
            return None
        return {"rank": self.lora_rank, "alpha": self.lora_alpha if self.lora_alpha is not None else self.lora_rank,
                "targets": list(self.lora_targets), "dropout": self.lora_dropout}


@dataclass
class Config:
    """Everything a run needs. `preset` records where the defaults came from."""

    preset: str = "cogvideox-2b"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def sampling_resolution(self) -> tuple[int, int, int]:
        """(frames, height, width) in pixels of the samples a run writes."""
        data = self.data.stage_configs()[-1][2]
        s = self.sampling
        return (s.num_frames or data.num_frames, s.height or data.height, s.width or data.width)

    def validate(self) -> "Config":
        self.model.validate()
        self.parallel.validate(self.model)
        self.diffusion.validate()
        self.data.validate(self.model)
        self.training.validate()
        self.sampling.validate(self.model, self.training, self.data)
        self.finetune.validate()
        if self.model.in_channels != self.model.out_channels and self.data.packing:
            raise ConfigError("data.packing", True, "image-to-video training does not pack clips yet: use "
                                                    "data.packing=false")
        if self.data.packing and self.training.micro_batch_size != 1:
            raise ConfigError("training.micro_batch_size", self.training.micro_batch_size,
                              "with data.packing a micro-batch is one pack: use 1 (raise data.pack_tokens for more "
                              "tokens per micro-batch)")
        if self.model.fp8 is not None and self.training.device != "cuda":
            raise ConfigError("model.fp8", self.model.fp8, "FP8 needs a CUDA GPU (training.device=cuda); use "
                                                           "model.fp8=null on CPU")
        if self.model.backend == "te" and self.training.device != "cuda":
            raise ConfigError("model.backend", "te", "Transformer Engine runs on GPU only: use model.backend=local "
                                                     "with --device cpu")
        return self

    def check_world(self, data_parallel_size: int) -> int:
        """Checks that need the data-parallel size (clear errors before anything is built); returns the
        global batch."""
        global_batch = self.training.global_batch(data_parallel_size)
        if self.diffusion.timestep_sampling == "explicit_uniform" and global_batch > self.diffusion.num_train_timesteps:
            raise ConfigError("training.global_batch_size", global_batch,
                              f"explicit uniform sampling gives each sample of a step its own stratum of the "
                              f"{self.diffusion.num_train_timesteps} timesteps: use a global batch of at most "
                              f"{self.diffusion.num_train_timesteps}, or diffusion.timestep_sampling=uniform")
        return global_batch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def require_positive_integers(section, section_name: str, names) -> None:
    for name in names:
        value = getattr(section, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{section_name}.{name}", value, "must be a positive integer")


def check_frame_count(field_name: str, frames, temporal_compression_ratio: int) -> None:
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % temporal_compression_ratio:
        raise ConfigError(field_name, frames,
                          f"frame counts must be 1+{temporal_compression_ratio}k (1, 5, 9, ..., 49)")


def parse_size(field_name: str, text: str) -> tuple[int, int]:
    """(height, width) of HEIGHTxWIDTH in pixels."""
    try:
        height, width = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ConfigError(field_name, text, "write HEIGHTxWIDTH in pixels, e.g. 480x720") from None
    return height, width


def model_config_from_dict(values: dict) -> ModelConfig:
    """Build a ModelConfig from a saved dict, refusing unknown keys."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError("model", unknown, "unknown model fields in the saved config; is this a cogvx-mega checkpoint?")
    return ModelConfig(**values)
