"""The diffusion objective, the optimisation and bookkeeping of a run, the samples it writes, and LoRA fine-tuning."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional

from cogvx_mega.config.errors import (ConfigError, check_choices, check_frame_count, check_hang_timeout,
                                     require_positive_integers)
from cogvx_mega.config.model import ModelConfig

if TYPE_CHECKING:
    from cogvx_mega.config.data import DataConfig

TimestepSampling = Literal["explicit_uniform", "uniform"]
Device = Literal["cpu", "cuda"]
WandbMode = Literal["online", "offline"]
MixedPrecision = Literal["auto", "bf16_params", "autocast"]
Recompute = Literal["none", "selective", "full"]
Scheduler = Literal["ddim", "dpm"]


@dataclass
class DiffusionConfig:
    """Training objective (REFERENCE §5)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift_scale: float = 3.0
    zero_terminal_snr: bool = True
    timestep_sampling: TimestepSampling = "explicit_uniform"
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
        check_choices(self, "diffusion")
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
    device: Device = "cuda"
    bf16: bool = True
    """Train in bf16 (see mixed_precision); false: fp32 everywhere."""
    mixed_precision: MixedPrecision = "auto"
    """How bf16 trains: 'bf16_params' (megatron's mixed precision: bf16 weights and compute, fp32 main
    gradients, fp32 master weights in the optimizer), 'autocast' (fp32 weights under bf16 autocast) or 'auto'
    (bf16_params on CUDA; CPU runs in fp32)."""
    recompute: Recompute = "none"
    """Activation recomputation: 'none', 'selective' (attention core) or 'full' (whole layers)."""
    recompute_num_layers: int = 1
    """With recompute=full: layers per recomputed group (megatron's uniform method)."""
    log_interval: int = 1
    """Every this many steps: telemetry (TFLOP/s, MFU, GPU readings) in metrics.jsonl and, when stderr is not a
    terminal (a batch job's log), one plain line `step N/M | loss | grad_norm | lr | samples/s | TFLOP/s`."""
    save_interval: int = 0
    """Save a checkpoint every N steps (0: by time only, see save_every_minutes; the last step always saves)."""
    save_every_minutes: Optional[float] = 30.0
    """Also save a checkpoint when this many minutes have passed since the last save (or the start of training),
    at the next step boundary; null or 0: no time-based saves. SIGINT, SIGTERM and SIGUSR1 save too."""
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
    ema_decay: Optional[float] = None
    """Keep an exponential moving average of the weights with this decay (e.g. 0.9999; None: none), sharded like
    the parameters, saved in checkpoints; sample/export/from_pretrained then read it by default (--weights)."""
    ema_start_step: int = 0
    """Before this step the average is the weights themselves; from it on it averages."""
    valid_every: int = 0
    """Every N steps, the loss on data.valid at fixed timesteps and noise, overall and per timestep bin (0: never)."""
    valid_samples: int = 8
    """Clips of data.valid the validation loss is measured on (a multiple of micro_batch_size x data parallel)."""
    valid_bins: int = 10
    """Equal timestep bins of 0..999 (10: bins of 100), one timestep per clip in each."""
    hang_timeout_s: Optional[float] = None
    """A hang watchdog on every rank (`cogvx_mega.training.watchdog`): a rank that finishes no step for this many
    seconds (a save, validation or sampling, and the first step after a start, may take 10 x that) writes one line
    naming it, its node and its last step, and every thread's stack, to stderr and
    <run_dir>/hangs/step<N>-rank<R>.txt, then exits with status 75 (the launcher requeues the job). Set it above the
    slowest step after the first. None or 0: no watchdog."""
    straggler_factor: Optional[float] = None
    """Every log_interval steps, name in the log (and as `stragglers` in metrics.jsonl, with
    `compute_time_median` and `compute_time_max`) each rank whose compute per step (from the step's start to its
    gradients being ready for the data-parallel reduction) is more than this factor x the median over ranks
    (e.g. 1.5; above 1), with its node (`cogvx_mega.training.stragglers`). Under tensor/pipeline parallelism the
    ranks of a group wait for each other inside the step, so a slow rank makes its group look slow: the report
    names the group (the node), not always the single rank. One small all-gather per log interval; the losses
    are the same. None: no report."""
    wandb_project: Optional[str] = None
    """Also log the TensorBoard scalars (and sample videos) to Weights & Biases under this project (the `wandb`
    package, an optional dependency); None: no W&B."""
    wandb_mode: Optional[WandbMode] = None
    """'online' or 'offline' (written under <run_dir>/wandb, `wandb sync` uploads it later; works without a
    network); None: wandb's own default (its WANDB_MODE environment variable, else online)."""

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
        check_choices(self, "training")
        require_positive_integers(self, "training", ("steps", "micro_batch_size", "recompute_num_layers", "log_interval"))
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError("training.global_batch_size", self.global_batch_size, "must be positive (or null)")
        if self.lr <= 0:
            raise ConfigError("training.lr", self.lr, "must be positive")
        if self.warmup_steps < 0:
            raise ConfigError("training.warmup_steps", self.warmup_steps, "must be >= 0")
        if self.keep_checkpoints < 1:
            raise ConfigError("training.keep_checkpoints", self.keep_checkpoints, "keep at least 1")
        if isinstance(self.save_interval, bool) or not isinstance(self.save_interval, int) or self.save_interval < 0:
            raise ConfigError("training.save_interval", self.save_interval, "use a number of steps (0: by time and at "
                                                                           "the end only)")
        if self.save_every_minutes is not None and not self.save_every_minutes >= 0:
            raise ConfigError("training.save_every_minutes", self.save_every_minutes, "use minutes (e.g. 30), or 0 / "
                                                                                     "null for no time-based saves")
        require_positive_integers(self, "training", ("loss_spike_window", "max_skipped_steps"))
        if self.loss_spike_factor is not None and not self.loss_spike_factor > 1:
            raise ConfigError("training.loss_spike_factor", self.loss_spike_factor, "use a factor above 1 (e.g. 3.0), "
                                                                                   "or null")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError("training.peak_tflops", self.peak_tflops, "use the per-GPU peak in TFLOP/s, or null")
        if isinstance(self.sample_every, bool) or not isinstance(self.sample_every, int) or self.sample_every < 0:
            raise ConfigError("training.sample_every", self.sample_every, "use a number of steps (0: no samples)")
        require_positive_integers(self, "training", ("valid_samples", "valid_bins"))
        if isinstance(self.valid_every, bool) or not isinstance(self.valid_every, int) or self.valid_every < 0:
            raise ConfigError("training.valid_every", self.valid_every, "use a number of steps (0: no validation)")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError("training.ema_decay", self.ema_decay, "use a decay between 0 and 1 (e.g. 0.9999), or "
                                                                   "null for no average")
        check_hang_timeout("training.hang_timeout_s", self.hang_timeout_s)
        if self.straggler_factor is not None and (isinstance(self.straggler_factor, bool)
                                                  or not isinstance(self.straggler_factor, (int, float))
                                                  or not self.straggler_factor > 1):
            raise ConfigError("training.straggler_factor", self.straggler_factor, "use a factor above 1 (e.g. 1.5) "
                                                                                 "of the median compute time, or null")
        if isinstance(self.ema_start_step, bool) or not isinstance(self.ema_start_step, int) or self.ema_start_step < 0:
            raise ConfigError("training.ema_start_step", self.ema_start_step, "use a step number (0: from the start)")


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
    scheduler: Scheduler = "dpm"
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
        check_choices(self, "sampling")
        require_positive_integers(self, "sampling", ("steps",))
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
        if model.is_image_to_video and not self.images:
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
