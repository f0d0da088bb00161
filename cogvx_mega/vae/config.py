"""VAE configuration: a typed dataclass, presets per model family, and the diffusers config mapping."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from cogvx_mega.config.errors import ConfigError


@dataclass
class VAEConfig:
    """The CogVideoX 3D causal VAE (`AutoencoderKLCogVideoX` fields, same names)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    temporal_compression_ratio: int = 4
    scaling_factor: float = 1.15258426
    """Latent scale applied by the diffusion model's data path (not by encode/decode)."""
    invert_scale_latents: bool = False
    """Image-to-video conditioning divides the first frame's latent by scaling_factor instead of multiplying
    it (diffusers' field: the CogVideoX1.5 I2V model was trained that way)."""
    sample_height: int = 480
    sample_width: int = 720

    @property
    def temporal_compression_levels(self) -> int:
        return int(math.log2(self.temporal_compression_ratio))

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> "VAEConfig":
        ratio = self.temporal_compression_ratio
        if ratio < 1 or ratio & (ratio - 1):
            raise ConfigError("vae.temporal_compression_ratio", ratio, "use a power of two (CogVideoX: 4)")
        if self.temporal_compression_levels > len(self.block_out_channels) - 1:
            raise ConfigError("vae.temporal_compression_ratio", ratio,
                              f"at most 2^{len(self.block_out_channels) - 1} with {len(self.block_out_channels)} blocks")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ConfigError("vae.block_out_channels", self.block_out_channels,
                                  f"every entry must be a multiple of norm_num_groups={self.norm_num_groups}")
        return self


def vae_preset(name: str) -> VAEConfig:
    """The VAE of a model family: all share the architecture; the latent scale differs (REFERENCE §1)."""
    scales = {"cogvideox-2b": 1.15258426, "cogvideox-5b": 0.7, "cogvideox-5b-i2v": 0.7, "cogvideox1.5-5b": 0.7,
              "cogvideox1.5-5b-i2v": 0.7}
    if name == "tiny":
        return VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         temporal_compression_ratio=2, sample_height=32, sample_width=32)
    if name not in scales:
        raise ConfigError("vae preset", name, f"choose one of tiny, {', '.join(scales)}")
    return VAEConfig(scaling_factor=scales[name], invert_scale_latents=name == "cogvideox1.5-5b-i2v")


# diffusers config keys that must hold these values for the architecture built here
_FIXED_DIFFUSERS_VALUES = {"act_fn": "silu", "use_quant_conv": False, "use_post_quant_conv": False,
                           "down_block_types": "CogVideoXDownBlock3D", "up_block_types": "CogVideoXUpBlock3D"}


def vae_config_from_diffusers(config: dict) -> VAEConfig:
    """A VAEConfig from a diffusers `AutoencoderKLCogVideoX` config.json (unsupported variants are refused)."""
    for key, expected in _FIXED_DIFFUSERS_VALUES.items():
        value = config.get(key, expected)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v != expected for v in values):
            raise ConfigError(f"vae config {key}", value, f"only {expected!r} is supported")
    return vae_config_from_dict(config)


def vae_config_from_dict(values: dict) -> VAEConfig:
    """A validated VAEConfig from JSON values (unknown keys, e.g. diffusers' bookkeeping, are ignored)."""
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    values = {k: v for k, v in values.items() if k in fields}
    if "block_out_channels" in values:
        values["block_out_channels"] = tuple(values["block_out_channels"])
    if "temporal_compression_ratio" in values:  # diffusers stores it as a float
        values["temporal_compression_ratio"] = int(values["temporal_compression_ratio"])
    return VAEConfig(**values).validate()


def vae_config_to_diffusers(config: VAEConfig) -> dict:
    blocks = len(config.block_out_channels)
    values = dataclasses.asdict(config)
    values["block_out_channels"] = list(config.block_out_channels)
    values.update({"_class_name": "AutoencoderKLCogVideoX", "act_fn": "silu", "use_quant_conv": False,
                   "use_post_quant_conv": False, "down_block_types": ["CogVideoXDownBlock3D"] * blocks,
                   "up_block_types": ["CogVideoXUpBlock3D"] * blocks})
    return values
