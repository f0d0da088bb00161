"""One entry point for transformer weights in any format we accept: a diffusers transformer folder, a
diffusers pipeline folder (its transformer/), a single-v1 or a torch-dist-v1 project checkpoint."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import Tensor

from cogvx_mega.config.schema import ConfigError, ModelConfig, model_config_from_dict
from cogvx_mega.checkpoint.meta import (SHARDED_FORMAT, SINGLE_FORMAT, TRANSFORMER_FORMATS, is_project_checkpoint,
                                        read_checkpoint_meta)
from cogvx_mega.checkpoint.single_file import open_single_file_checkpoint
from cogvx_mega.checkpoint.transformer import open_diffusers_transformer
from cogvx_mega.checkpoint.weights import TensorSource


@dataclass
class TransformerWeights:
    """Where a checkpoint's transformer weights are and how to read them."""

    path: Path
    kind: str
    """'diffusers', 'single' or 'sharded'."""
    model: ModelConfig
    meta: dict
    source: Optional[TensorSource]
    """Project-named tensors read lazily (diffusers and single); None for sharded checkpoints, which are
    read through megatron (at a layout) or `read_sharded_model_state` (in one process)."""


def open_transformer_weights(path: str | os.PathLike) -> TransformerWeights:
    folder = Path(path)
    if not folder.exists():
        raise ConfigError("checkpoint", str(path), "no such file or folder; pass a diffusers transformer (or "
                                                   "pipeline) folder or a cogvx-mega checkpoint folder")
    if is_project_checkpoint(folder):
        meta = read_checkpoint_meta(folder)
        if meta["format"] not in TRANSFORMER_FORMATS:
            raise ConfigError("checkpoint", str(path), f"format {meta['format']!r} is not a transformer checkpoint "
                                                       f"({', '.join(TRANSFORMER_FORMATS)})")
        if meta["format"] == SHARDED_FORMAT:
            return TransformerWeights(folder, "sharded", model_config_from_dict(meta["model"]), meta, None)
        assert meta["format"] == SINGLE_FORMAT
        model, source = open_single_file_checkpoint(folder, meta)
        return TransformerWeights(folder, "single", model, meta, source)
    model, source = open_diffusers_transformer(folder)
    return TransformerWeights(folder, "diffusers", model, {"format": "diffusers", "step": 0}, source)


def read_transformer_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Tensor], dict]:
    """(model config, the whole project-named state, metadata) of any accepted format, in this process:
    nothing is built, no process group is touched. A LoRA checkpoint gives its base with the adapters merged."""
    from cogvx_mega.checkpoint.sharded import read_sharded_model_state

    weights = open_transformer_weights(path)
    if weights.kind == "sharded" and weights.meta.get("lora"):  # adapters + a pointer to the base: merged here
        from cogvx_mega.checkpoint.lora import read_merged_lora_checkpoint

        model, state = read_merged_lora_checkpoint(weights.path, weights.meta)
        return model, state, weights.meta
    if weights.kind == "sharded":
        model, state = read_sharded_model_state(weights.path, weights.meta)
        return model, state, weights.meta
    if weights.kind == "diffusers":
        weights.source.check_nothing_unused()
    return weights.model, weights.source.read_all(), weights.meta


def read_project_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Tensor], dict]:
    """Like `read_transformer_checkpoint`, for project checkpoints only (single-v1 or torch-dist-v1)."""
    if not is_project_checkpoint(path):
        read_checkpoint_meta(path)  # raises the clear "no cogvx_checkpoint.json" error
    return read_transformer_checkpoint(path)
