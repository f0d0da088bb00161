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
from typing import Optional

import torch

from cogvx_mega.checkpoint.lora import accumulate_deltas, deltas_from_diffusers_lora
from cogvx_mega.checkpoint.reader import (Verify, open_transformer_weights, reads_average, resolve_lora_chain,
                                         verified)
from cogvx_mega.checkpoint.sharded import load_sharded_checkpoint
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.model import ModelConfig
from cogvx_mega.model.init import global_parameter_name
from cogvx_mega.parallel.pipeline import unwrap_model
from cogvx_mega.training import checkpoint as ckpt

logger = logging.getLogger(__name__)


@torch.no_grad()
def load_pretrained_weights(model_chunks, path: str, model_config: ModelConfig, lora: Optional[str] = None,
                            verify: Verify = None, weights_choice: Optional[str] = "model") -> dict:
    """Copy the weights at `path` into this rank's chunks (call before wrapping them for training);
    returns the checkpoint's metadata. The model config must match the checkpoint's (backend aside).

    A LoRA training checkpoint loads as its base with the adapters merged; `lora` (a diffusers/PEFT LoRA
    folder or file) is merged into the weights as well. Each rank adds only its shard of every delta. `verify`
    checks each project checkpoint read first (`checkpoint.reader.Verify`; None: the caller has).
    `weights_choice`: 'model' (what training starts from), 'ema' or None (`checkpoint.reader.reads_average`)."""
    requested = verified(open_transformer_weights(path), verify)
    average = reads_average(requested, weights_choice)
    weights, deltas = resolve_lora_chain(requested, verify, ema=average)  # a LoRA checkpoint: its base (over a base ...) and the deltas
    ckpt.check_same_model({"model": dataclasses.asdict(weights.model)}, model_config, path,
                          ignore=ckpt.NOT_IN_THE_WEIGHTS)
    if lora is not None:
        accumulate_deltas(deltas, deltas_from_diffusers_lora(lora, model_config))
    chunks = [unwrap_model(chunk) for chunk in model_chunks]
    if weights.kind == "sharded":
        load_sharded_checkpoint(weights.path, chunks, ema=average and weights is requested)
    else:
        _copy_from_source(chunks, weights.source, path)
    if deltas:
        _add_deltas(chunks, deltas, path if lora is None else lora)
    return requested.meta


def _shard_of(param, tp_size: int, tp_rank: int) -> tuple[Optional[int], int]:
    """(partition dim, start) of this rank's slice of a tensor-parallel parameter (None: whole)."""
    if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
        return param.partition_dim, tp_rank * param.shape[param.partition_dim]
    return None, 0


def _copy_from_source(chunks, source, path) -> None:
    from megatron.core.utils import get_pg_rank, get_pg_size

    available = source.keys()
    for chunk in chunks:
        tp_size, tp_rank = get_pg_size(chunk.tp_group), get_pg_rank(chunk.tp_group)
        for name, param in chunk.named_parameters():
            key = global_parameter_name(chunk, name)
            if key not in available:
                raise ConfigError("--init-from", str(path), f"has no tensor for {key!r}")
            dim, start = _shard_of(param, tp_size, tp_rank)
            value = source.read(key) if dim is None else source.read(key, dim, start, start + param.shape[dim])
            if tuple(value.shape) != tuple(param.shape):
                raise ConfigError("--init-from", str(path), f"{key}: shape {tuple(value.shape)} does not fit this "
                                                            f"rank's parameter {tuple(param.shape)}")
            param.copy_(value)


def _add_deltas(chunks, deltas: dict, path) -> None:
    """Add this rank's slice of each LoRA delta (full-size, project keys) to its weights."""
    from megatron.core.utils import get_pg_rank, get_pg_size

    for chunk in chunks:
        tp_size, tp_rank = get_pg_size(chunk.tp_group), get_pg_rank(chunk.tp_group)
        for name, param in chunk.named_parameters():
            delta = deltas.get(global_parameter_name(chunk, name))
            if delta is None:
                continue
            dim, start = _shard_of(param, tp_size, tp_rank)
            piece = delta if dim is None else delta.narrow(dim, start, param.shape[dim])
            if tuple(piece.shape) != tuple(param.shape):
                raise ConfigError("--init-lora", str(path), f"{name}: the LoRA delta {tuple(delta.shape)} does not fit "
                                                            f"the model's weight")
            param.copy_((param.float() + piece.to(param.device)).to(param.dtype))
