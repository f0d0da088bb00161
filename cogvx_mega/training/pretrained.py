"""`--init-from`: released or earlier weights loaded straight onto this rank's chunks at the current layout.

A diffusers folder or a single-file checkpoint is read through a lazy `TensorSource`: every parameter of
this rank's chunks (its pipeline stage's layers only) reads just its tensor-parallel shard from disk (the
rows of to_q / to_k / to_v that make its `linear_qkv` shard, the columns of its row-parallel weights), so
no rank ever holds the whole model. A sharded training checkpoint goes through megatron's dist_checkpointing
load, which reads only this rank's shards. The optimizer is not touched: the run starts fresh at step 0.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..checkpoint.reader import open_transformer_weights
from ..checkpoint.sharded import load_sharded_checkpoint
from ..config.schema import ConfigError, ModelConfig
from ..model.init import global_parameter_name
from ..parallel.pipeline import unwrap_model
from . import checkpoint as ckpt

logger = logging.getLogger(__name__)


@torch.no_grad()
def load_pretrained_weights(model_chunks, path: str, model_config: ModelConfig) -> dict:
    """Copy the weights at `path` into this rank's chunks (call before wrapping them for training);
    returns the checkpoint's metadata. The model config must match the checkpoint's (backend aside)."""
    from megatron.core.utils import get_pg_rank, get_pg_size

    weights = open_transformer_weights(path)
    ckpt.check_same_model({"model": dataclasses.asdict(weights.model)}, model_config, path,
                          ignore=ckpt.NOT_IN_THE_WEIGHTS)
    chunks = [unwrap_model(chunk) for chunk in model_chunks]
    if weights.kind == "sharded":
        load_sharded_checkpoint(path, chunks)
        return weights.meta
    source = weights.source
    available = source.keys()
    for chunk in chunks:
        tp_size, tp_rank = get_pg_size(chunk.tp_group), get_pg_rank(chunk.tp_group)
        for name, param in chunk.named_parameters():
            key = global_parameter_name(chunk, name)
            if key not in available:
                raise ConfigError("--init-from", str(path), f"has no tensor for {key!r}")
            if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
                dim = param.partition_dim
                start = tp_rank * param.shape[dim]
                value = source.read(key, dim, start, start + param.shape[dim])
            else:
                value = source.read(key)
            if tuple(value.shape) != tuple(param.shape):
                raise ConfigError("--init-from", str(path), f"{key}: shape {tuple(value.shape)} does not fit this "
                                                            f"rank's parameter {tuple(param.shape)}")
            param.copy_(value)
    return weights.meta

