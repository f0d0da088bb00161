"""Named presets: plain functions that build on each other (REFERENCE §1)."""
from __future__ import annotations

import dataclasses
from typing import Callable

from cogvx_mega.config.data import DataConfig
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.model import ModelConfig
from cogvx_mega.config.schema import Config
from cogvx_mega.config.training import DiffusionConfig, TrainingConfig


def cogvideox_2b() -> Config:
    return Config(
        preset="cogvideox-2b",
        model=ModelConfig(num_layers=30, num_attention_heads=30, attention_head_dim=64,
                          positional_embedding="sincos", latent_scale=1.15258426),
        diffusion=DiffusionConfig(snr_shift_scale=3.0),
        data=DataConfig(num_frames=49, height=480, width=720),
    )


def cogvideox_5b() -> Config:
    config = cogvideox_2b()
    config.preset = "cogvideox-5b"
    config.model = dataclasses.replace(config.model, num_layers=42, num_attention_heads=48,
                                       positional_embedding="rope", latent_scale=0.7)
    config.diffusion = dataclasses.replace(config.diffusion, snr_shift_scale=1.0)
    return config


def cogvideox_5b_i2v() -> Config:
    config = cogvideox_5b()
    config.preset = "cogvideox-5b-i2v"
    config.model = dataclasses.replace(config.model, in_channels=32, positional_embedding="rope+learned")
    return config


def cogvideox15_5b() -> Config:
    config = cogvideox_5b()
    config.preset = "cogvideox1.5-5b"
    config.model = dataclasses.replace(config.model, patch_size_t=2, patch_bias=False, sample_frames=81,
                                       sample_height=300, sample_width=300)
    config.data = dataclasses.replace(config.data, num_frames=81, height=768, width=1360)
    return config


def cogvideox15_5b_i2v() -> Config:
    config = cogvideox15_5b()
    config.preset = "cogvideox1.5-5b-i2v"
    config.model = dataclasses.replace(config.model, in_channels=32, ofs_embed_dim=512)
    return config


def tiny() -> Config:
    """A 5B-shaped model small enough for CPU tests and the demo; admits TP/CP of 2 and 4, PP 4 x VPP 2."""
    return Config(
        preset="tiny",
        model=ModelConfig(num_layers=8, num_attention_heads=4, attention_head_dim=16, in_channels=4,
                          out_channels=4, time_embed_dim=32, text_embed_dim=32, max_text_seq_length=16,
                          sample_frames=9, sample_height=8, sample_width=8, positional_embedding="rope",
                          latent_scale=1.0),
        diffusion=DiffusionConfig(snr_shift_scale=1.0),
        data=DataConfig(num_frames=9, height=64, width=64, num_synthetic_clips=64),
        training=TrainingConfig(steps=300, micro_batch_size=4, lr=2e-3, warmup_steps=20, device="cpu",
                                bf16=False, run_dir="runs/tiny"),
    )


def tiny_i2v() -> Config:
    """`tiny` as a 5B-I2V model: image latent channels in, learned positions at the sample resolution."""
    config = tiny()
    config.preset = "tiny-i2v"
    config.model = dataclasses.replace(config.model, in_channels=8, positional_embedding="rope+learned")
    return config


def tiny15_i2v() -> Config:
    """`tiny` as a 1.5-I2V model: p_t = 2 Linear patches without the conv bias, the ofs embedding; 13 frames
    (4 latent frames, whole temporal patches)."""
    config = tiny()
    config.preset = "tiny1.5-i2v"
    config.model = dataclasses.replace(config.model, in_channels=8, patch_size_t=2, patch_bias=False,
                                       ofs_embed_dim=config.model.time_embed_dim, sample_frames=13)
    config.data = dataclasses.replace(config.data, num_frames=13)
    return config


PRESETS: dict[str, Callable[[], Config]] = {
    "tiny": tiny,
    "tiny-i2v": tiny_i2v,
    "tiny1.5-i2v": tiny15_i2v,
    "cogvideox-2b": cogvideox_2b,
    "cogvideox-5b": cogvideox_5b,
    "cogvideox-5b-i2v": cogvideox_5b_i2v,
    "cogvideox1.5-5b": cogvideox15_5b,
    "cogvideox1.5-5b-i2v": cogvideox15_5b_i2v,
}


def get_preset(name: str) -> Config:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError("preset", name, f"unknown preset; choose one of {', '.join(PRESETS)}") from None
