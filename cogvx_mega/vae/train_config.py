"""What a VAE training run is: the VAE (a preset), its losses and the `vae_train` section, as typed dataclasses
resolved like the transformer's config (preset, then a YAML/TOML file, then `section.field=value` overrides).

Presets: `tiny` (the tiny VAE, 9 frames at 32x32, for tests and CPU demos: 200 steps on a few clips take
under a minute on 2 cores, with the GAN from step 100 at a lower weight, 0.1, so that PSNR keeps rising) and every VAE family name
(`cogvideox-2b`, ...): the paper's first stage, 17 frames at 256x256, fps drawn from {8, 16}. The second stage
(161 frames under context parallel) is the same preset with `vae_train.frames=161` and `--init-from` the first
stage (examples/vae_train/).

The loss weights are ours (the paper gives none): the VQGAN recipe's L1 + LPIPS (weight 1) + KL (1e-6) and a
hinge GAN whose generator term is scaled by the adaptive weight, switched on at `loss.gan_start_step`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from cogvx_mega.config.errors import (ConfigError, check_choices, check_frame_count, check_hang_timeout,
                                     require_positive_integers)
from cogvx_mega.config.loading import resolve_config
from cogvx_mega.vae.config import VAEConfig, vae_config_from_dict, vae_preset
from cogvx_mega.vae.losses import VAELossConfig, VAELossError

VAE_PRESETS = ("tiny", "cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b", "cogvideox1.5-5b-i2v")


@dataclass
class VAETrainConfig:
    frames: int = 17
    """Frames per training clip (1 + 4k; the tiny VAE: 1 + 2k). A clip too short at every fps is skipped."""
    size: int = 256
    """Clips are resized (short side) and centre-cropped to size x size pixels."""
    fps_choices: list = field(default_factory=lambda: [8.0, 16.0])
    """Each clip is read at an fps drawn from these (keyed on its global sample slot); a clip whose own rate is
    lower is read at its own rate."""
    random_start: bool = True
    """Start each clip at a keyed random time in it (else at its start)."""
    global_batch_size: int = 8
    """Clips per step over all data-parallel replicas (a multiple of the data-parallel size)."""
    steps: int = 1000
    lr: float = 1e-4
    disc_lr: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    """Clip the VAE's and the discriminator's gradient norms to this (0: no clipping)."""
    seed: int = 42
    sample_posterior: bool = True
    """Decode a draw from the posterior (keyed noise), as the paper's VAE trains; false: its mean."""
    lpips_vgg: Optional[str] = None
    """torchvision's VGG16 weights (vgg16-397923af.pth), needed when loss.perceptual_weight > 0."""
    lpips_lin: Optional[str] = None
    """The lpips package's linear layers (weights/v0.1/vgg.pth)."""
    disc_dim: int = 64
    disc_max_dim: int = 512
    disc_frame_num: Optional[int] = None
    """Frames the discriminator halves time over (a power of two); None: the largest power of two that divides
    frames - 1 and the crop size allows. It sees frames 1.. of each clip (frame 0 is encoded alone)."""
    log_interval: int = 10
    save_interval: int = 500
    keep_checkpoints: int = 3
    hang_timeout_s: Optional[float] = None
    """The hang watchdog of `training.hang_timeout_s` on every rank (`cogvx_mega.training.watchdog`): a rank that
    finishes no step for this many seconds (a save, and the first step after a start, may take 10 x that) writes
    its stacks to stderr and <run_dir>/hangs/ and exits with status 75, so the launcher requeues the job. None or
    0: no watchdog."""
    device: Optional[Literal["cpu", "cuda"]] = None
    """None: CUDA when available."""
    conv_impl: Literal["halo", "naive"] = "halo"

    def validate(self, vae: VAEConfig) -> "VAETrainConfig":
        require_positive_integers(self, "vae_train", ("frames", "size", "global_batch_size", "steps", "log_interval",
                                                      "save_interval", "keep_checkpoints", "disc_dim", "disc_max_dim"))
        check_choices(self, "vae_train")
        check_hang_timeout("vae_train.hang_timeout_s", self.hang_timeout_s)
        check_frame_count("vae_train.frames", self.frames, vae.temporal_compression_ratio)
        if self.size % vae.spatial_compression_ratio:
            raise ConfigError("vae_train.size", self.size, f"use a multiple of the VAE's spatial compression "
                                                           f"({vae.spatial_compression_ratio})")
        if isinstance(self.fps_choices, (int, float)):
            self.fps_choices = [self.fps_choices]
        if not self.fps_choices or any(isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0
                                       for f in self.fps_choices):
            raise ConfigError("vae_train.fps_choices", self.fps_choices, "give a list of positive frame rates, "
                                                                         "e.g. [8, 16]")
        self.fps_choices = [float(f) for f in self.fps_choices]
        for name in ("lr", "disc_lr", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"vae_train.{name}", getattr(self, name), "must not be negative")
        if self.warmup_steps < 0:
            raise ConfigError("vae_train.warmup_steps", self.warmup_steps, "must not be negative")
        frame_num = self.disc_frames()
        if frame_num & (frame_num - 1) or (self.frames - 1) % frame_num:
            raise ConfigError("vae_train.disc_frame_num", self.disc_frame_num,
                              f"use a power of two that divides frames - 1 = {self.frames - 1}")
        return self

    def disc_frames(self) -> int:
        """The discriminator's frame_num (see `disc_frame_num`)."""
        if self.disc_frame_num is not None:
            return self.disc_frame_num
        space_levels = max(0, self.size.bit_length() - 1 - 2)  # Discriminator3D: log2(size) - 2 levels
        frame_num = 1
        while (self.frames - 1) % (frame_num * 2) == 0 and frame_num * 2 <= self.frames - 1 \
                and (frame_num * 2).bit_length() - 1 <= space_levels:
            frame_num *= 2
        return frame_num


@dataclass
class VAERunConfig:
    preset: str = "tiny"
    vae: VAEConfig = field(default_factory=VAEConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    vae_train: VAETrainConfig = field(default_factory=VAETrainConfig)

    def validate(self) -> "VAERunConfig":
        if isinstance(self.vae.block_out_channels, list):
            self.vae.block_out_channels = tuple(self.vae.block_out_channels)
        self.vae.validate()
        try:
            self.loss.validate()
        except VAELossError as error:
            raise ConfigError("loss", str(error).split("=")[0], str(error)) from None
        self.vae_train.validate(self.vae)
        if self.loss.perceptual_weight > 0 and (self.vae_train.lpips_vgg is None or self.vae_train.lpips_lin is None):
            raise ConfigError("loss.perceptual_weight", self.loss.perceptual_weight,
                              "LPIPS needs its weights: set vae_train.lpips_vgg (torchvision's vgg16-397923af.pth) "
                              "and vae_train.lpips_lin (the lpips package's weights/v0.1/vgg.pth), or "
                              "loss.perceptual_weight=0 to train without it")
        return self

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["vae"]["block_out_channels"] = list(self.vae.block_out_channels)
        return values


def vae_run_preset(name: str) -> VAERunConfig:
    if name not in VAE_PRESETS:
        raise ConfigError("--preset", name, f"choose one of {', '.join(VAE_PRESETS)}")
    if name == "tiny":
        return VAERunConfig(preset=name, vae=vae_preset("tiny"),
                            vae_train=VAETrainConfig(frames=9, size=32, global_batch_size=2, disc_dim=8,
                                                     disc_max_dim=32, lr=1e-3, disc_lr=2e-4, adam_beta1=0.5,
                                                     adam_beta2=0.9, save_interval=50, log_interval=10, steps=200),
                            loss=VAELossConfig(gan_start_step=100, disc_weight=0.1))
    return VAERunConfig(preset=name, vae=vae_preset(name), loss=VAELossConfig(gan_start_step=5000))


# the fields a resume may change: speed and bookkeeping, never what a step computes
RESUME_SAFE_VAE_TRAIN_FIELDS = {"steps", "log_interval", "save_interval", "keep_checkpoints", "device", "lpips_vgg",
                                "lpips_lin", "hang_timeout_s"}


def load_vae_run_config(preset: Optional[str] = None, config_file: Optional[str] = None,
                        overrides=()) -> VAERunConfig:
    """Preset defaults, then the file's values, then `section.field=value` overrides; validated."""
    return resolve_config(vae_run_preset, "tiny", preset, config_file, overrides, example="vae_train.lr=1e-4")


def run_config_from_dict(values: dict) -> VAERunConfig:
    """The config a checkpoint recorded (`to_dict`)."""
    return VAERunConfig(preset=values["preset"], vae=vae_config_from_dict(values["vae"]),
                        loss=VAELossConfig(**values["loss"]), vae_train=VAETrainConfig(**values["vae_train"]))


# the VAE fields that describe its weights (a preset that differs in these cannot start from --init-from)
ARCHITECTURE_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                       "norm_num_groups", "norm_eps", "temporal_compression_ratio")


def architecture_differences(a: VAEConfig, b: VAEConfig) -> list[str]:
    return [name for name in ARCHITECTURE_FIELDS if tuple(_listed(getattr(a, name))) != tuple(_listed(getattr(b, name)))]


def _listed(value):
    return value if isinstance(value, (list, tuple)) else [value]
