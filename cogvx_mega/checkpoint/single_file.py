"""Format single-v1: the whole transformer in `model.safetensors` (megatron parameter names, unsharded)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import torch

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.model import ModelConfig, model_config_from_dict
from cogvx_mega.checkpoint.atomic import atomic_directory
from cogvx_mega.checkpoint.meta import META_FILE, MODEL_FILE, SINGLE_FORMAT
from cogvx_mega.checkpoint.verify import record_files
from cogvx_mega.checkpoint.weights import SafetensorsTensors


def write_single_file_checkpoint(path: str | os.PathLike, tensors: dict, meta: dict) -> Path:
    """model.safetensors + cogvx_checkpoint.json, atomically (the metadata is written last)."""
    from safetensors.torch import save_file

    with atomic_directory(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / MODEL_FILE))
        # the size and CRC32C of the weights, as sharded checkpoints record theirs (`checkpoint.verify`)
        (tmp / META_FILE).write_text(json.dumps({**meta, "files": record_files(tmp, [MODEL_FILE])}, indent=2))
    return Path(path)


def save_project_checkpoint(path: str | os.PathLike, model_config: ModelConfig, state: dict,
                            step: int = 0, extra: Optional[dict] = None) -> Path:
    tensors = {k: v for k, v in state.items() if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}
    meta = {"format": SINGLE_FORMAT, "step": step, "model": dataclasses.asdict(model_config), **(extra or {})}
    return write_single_file_checkpoint(path, tensors, meta)


def open_single_file_checkpoint(path: str | os.PathLike, meta: dict) -> tuple[ModelConfig, SafetensorsTensors]:
    """(model config, lazy project-named tensors) of a single-v1 folder whose metadata is `meta`."""
    file = Path(path) / MODEL_FILE
    if not file.is_file():
        raise ConfigError("checkpoint", str(path), f"{MODEL_FILE} is missing; the checkpoint is incomplete")
    return model_config_from_dict(meta["model"]), SafetensorsTensors([file])
