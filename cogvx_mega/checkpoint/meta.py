"""The metadata file every project checkpoint folder holds, and the format names it records."""
from __future__ import annotations

import json
import os
from pathlib import Path

from cogvx_mega.config.errors import ConfigError

META_FILE = "cogvx_checkpoint.json"
MODEL_FILE = "model.safetensors"
SINGLE_FORMAT = "cogvx-mega/single-v1"
SHARDED_FORMAT = "cogvx-mega/torch-dist-v1"
VAE_FORMAT = "cogvx-mega/vae-single-v1"
VAE_TRAINING_FORMAT = "cogvx-mega/vae-train-v1"
"""A VAE training step: the VAE as in vae-single-v1 (model.safetensors), the discriminator and both optimizers."""
TRANSFORMER_FORMATS = (SINGLE_FORMAT, SHARDED_FORMAT)


class ConversionError(ValueError):
    """A checkpoint that does not fit the expected family or format."""


def is_project_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """The metadata of a complete project checkpoint; a clear error when it is missing or unreadable."""
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise ConfigError("checkpoint", str(path), f"no {META_FILE} there; pass a complete cogvx-mega checkpoint "
                                                   f"folder (or a diffusers folder where one is accepted)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError("checkpoint", str(path), f"{META_FILE} is not valid JSON ({error}); the checkpoint is "
                                                   f"damaged: use another one") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise ConfigError("checkpoint", str(path), f"{META_FILE} names no format; the checkpoint is damaged")
    return meta
