"""The model section: the CogVideoX expert transformer's shape (field names follow diffusers where one exists) and
how it runs (backend, kernels, FP8)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from cogvx_mega.config.errors import ConfigError, check_choices, check_frame_count, require_positive_integers

PositionalEmbedding = Literal["sincos", "rope", "rope+learned"]
Backend = Literal["local", "te"]
RopeImpl = Literal["auto", "torch", "triton", "te"]
AdalnImpl = Literal["torch", "triton"]
Fp8Format = Literal["e4m3", "hybrid"]
Fp8Recipe = Literal["delayed", "current", "mxfp8"]
PackedAttention = Literal["per_clip", "sdpa_mask", "flex", "flash"]  # = parallel.varlen.VARLEN_KERNELS
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise", "mxfp8": "mxfp8"}  # ours -> megatron's names
FP8_ALIGNMENT = 16  # TE's FP8 GEMMs take token counts divisible by 16
# ModelConfig fields that choose how the model runs, not what its weights are: a checkpoint loads and resumes
# with any value of them (`from_pretrained(..., **overrides)`, `--resume`).
RUNTIME_MODEL_FIELDS = ("backend", "rope_impl", "adaln_impl", "packed_attention", "fp8", "fp8_recipe",
                        "fp8_bf16_edge_layers", "fp8_amax_history_len")
# Fields a loader may set on weights trained without them: they change the numbers slightly but are not stored
# in any tensor (SAT's final-LayerNorm eps, for a user who wants SAT's own outputs from converted weights).
LOADER_MODEL_FIELDS = RUNTIME_MODEL_FIELDS + ("output_norm_eps",)


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
    positional_embedding: PositionalEmbedding = "sincos"
    """'sincos' (2B), 'rope' (5B, 1.5) or 'rope+learned' (5B-I2V)."""
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    norm_eps: float = 1e-5
    """eps of every LayerNorm of the blocks and, unless `output_norm_eps` is set, of the final adaptive one."""
    output_norm_eps: Optional[float] = None
    """eps of the final adaptive LayerNorm before the output projection; None: `norm_eps`, as diffusers (which
    has one eps for all). THUDM's SAT code uses 1e-6 there (1e-5 elsewhere): 1e-6 reproduces SAT's own numbers,
    which differ from diffusers' by about 5e-6. A diffusers export cannot hold two values and writes `norm_eps`."""
    qk_norm_eps: float = 1e-6
    backend: Backend = "local"
    """'local' (pure torch, any device) or 'te' (Transformer Engine, GPU)."""
    rope_impl: RopeImpl = "auto"
    """Who applies the 3D RoPE to q and k: 'torch' (reference), 'triton' (one-launch kernel, forward and
    backward), 'te' (Transformer Engine's fused RoPE, CUDA) or 'auto' (triton on CUDA, torch elsewhere)."""
    adaln_impl: AdalnImpl = "torch"
    """Expert AdaLN: 'torch' (LayerNorm, then the token's shift/scale/gate as [s, b, h] tensors) or 'triton'
    (LayerNorm + shift/scale in one kernel and the gated residual add in another, forward and backward)."""
    fp8: Optional[Fp8Format] = None
    """FP8 through Transformer Engine (model.backend=te, CUDA): None (bf16), 'hybrid' (e4m3 forward, e5m2
    gradients) or 'e4m3'. Weights stay fp32 masters and checkpoints keep their format: an FP8 run resumes in
    bf16 and back."""
    fp8_recipe: Fp8Recipe = "delayed"
    """'delayed' (scales from an amax history), 'current' (per-tensor scales of the current step) or 'mxfp8'
    (block scales; Blackwell GPUs)."""
    fp8_bf16_edge_layers: int = 0
    """Keep this many layers at each end of every pipeline stage in bf16 (not with the delayed recipe)."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: steps of amax history the scale is taken from (the max over them)."""
    packed_attention: PackedAttention = "per_clip"
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
        check_choices(self, "model")
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
    def is_image_to_video(self) -> bool:
        """The model takes the image latent beside the noisy latents (in_channels = 2 x out_channels)."""
        return self.in_channels != self.out_channels

    @property
    def final_norm_eps(self) -> float:
        """The eps the final adaptive LayerNorm uses (`output_norm_eps`, else `norm_eps`)."""
        return self.norm_eps if self.output_norm_eps is None else self.output_norm_eps

    @property
    def uses_rope(self) -> bool:
        return self.positional_embedding in ("rope", "rope+learned")

    def validate(self) -> None:
        check_choices(self, "model")
        require_positive_integers(self, "model", ("num_layers", "num_attention_heads", "attention_head_dim",
                                                  "in_channels", "out_channels", "time_embed_dim", "text_embed_dim",
                                                  "max_text_seq_length", "patch_size", "sample_height",
                                                  "sample_width"))
        for name in ("norm_eps", "output_norm_eps", "qk_norm_eps"):
            eps = getattr(self, name)
            if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
                raise ConfigError(f"model.{name}", eps, "use a small positive number such as 1e-5 or 1e-6")
        if self.in_channels not in (self.out_channels, 2 * self.out_channels):
            raise ConfigError("model.in_channels", self.in_channels,
                              f"use out_channels={self.out_channels} (text-to-video) or twice that (image-to-video: "
                              f"noisy latents and the image latent)")
        self.validate_fp8()
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


def model_config_from_dict(values: dict) -> ModelConfig:
    """Build a ModelConfig from a saved dict, refusing unknown keys."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError("model", unknown, "unknown model fields in the saved config; is this a cogvx-mega checkpoint?")
    return ModelConfig(**values)
