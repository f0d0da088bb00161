"""Format torch-dist-v1: megatron dist_checkpointing `torch_dist` shards of the model and the optimizer.

Training writes it from every rank at any TP/PP/VPP/CP/DP layout and reloads it at any other
(`save_sharded_checkpoint`, `load_sharded_checkpoint`). `read_sharded_model_state` reads the model alone
into one process through torch.distributed.checkpoint without a process group (the tools, `from_pretrained`).

Tensors are keyed by their global names; megatron stacks the layers of `decoder.layers.*` into one tensor
with a leading layer dimension, which `read_sharded_model_state` unstacks into per-layer names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.model import ModelConfig, model_config_from_dict
from cogvx_mega.parallel.pipeline import unwrap_model
from cogvx_mega.checkpoint import faults
from cogvx_mega.checkpoint.atomic import swap_into_place
from cogvx_mega.files import full_disk_error
from cogvx_mega.checkpoint.verify import files_written_by, record_files
from cogvx_mega.checkpoint.meta import META_FILE, SHARDED_FORMAT
from cogvx_mega.checkpoint.transformer import PROJECT_LAYER, project_keys

logger = logging.getLogger(__name__)

# Optimizer state saved so that it reloads at any TP/PP/CP/DP layout (megatron's default for the
# distributed optimizer in 0.16.1 raises "flattened_range is not supported").
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
EMA_PREFIX = "ema."
"""The stored names of a run's weight average (`training.ema`): `ema.<the parameter's global name>`."""


def model_sharded_state(model_chunks, keep: Optional[Callable[[str], bool]] = None) -> dict:
    """{'model': ...} for one chunk, {'model0': ..., 'model1': ...} for virtual pipeline chunks; with `keep`,
    only the tensors whose names it accepts (a LoRA run saves its adapters alone).

    Tensors are keyed by their global names, so the nesting does not tie a checkpoint to a layout.
    """
    chunks = [unwrap_model(chunk) for chunk in model_chunks]
    states = [chunk.sharded_state_dict() for chunk in chunks]
    if keep is not None:
        states = [{key: value for key, value in state.items() if keep(key)} for state in states]
    if len(chunks) == 1:
        return {"model": states[0]}
    return {f"model{i}": state for i, state in enumerate(states)}


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_sharded_checkpoint(path: str | Path, model_chunks, optimizer, meta: dict, async_queue=None,
                            on_complete: Optional[Callable[[], None]] = None,
                            keep: Optional[Callable[[str], bool]] = None, extra_state: Optional[dict] = None) -> Path:
    """Every rank writes its shards into a hidden temporary folder and records their sizes and CRC32Cs; rank 0
    then adds the metadata (which marks the checkpoint complete and lists every file, `checkpoint.verify`)
    and renames it into place. A run killed mid-save leaves only the
    temporary folder, which no reader lists and the next save of that step replaces; a save that fails (a full
    disk) removes it on every rank (`_removed_on_failure`).

    `meta` is the metadata to record (model config, step, training config, ...); the format is added here.
    `extra_state`: more sharded tensors saved beside the model (the weight average, `training.ema`).
    With `async_queue` (megatron's `AsyncCallsQueue`) the state is snapshotted now, the shards are written
    by a background process and the metadata + rename (then `on_complete`) run when the queue finalizes
    the request on every rank; until then the checkpoint does not exist for readers.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    final = Path(path)
    tmp = final.parent / f".{final.name}.tmp"
    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state = model_sharded_state(model_chunks, keep)
    state = {**model_state, **(extra_state or {}), "step": meta["step"],
             "optimizer": optimizer.sharded_state_dict(model_state, is_loading=False, metadata=OPTIMIZER_METADATA)}

    def complete() -> None:
        _barrier()  # every rank's shards are on disk: each checksums its own, rank 0 records them all
        files = record_files(tmp, files_written_by(tmp, dist.get_rank() if dist.is_initialized() else 0))
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size() if is_writer else None
            dist.gather_object(files, gathered, dst=0)
            if is_writer:
                files = {name: record for part in gathered for name, record in part.items()}
        if is_writer:
            (tmp / META_FILE).write_text(json.dumps({"format": SHARDED_FORMAT, **meta, "files": files}, indent=2))
            faults.maybe_kill("rename", meta["step"])
            swap_into_place(tmp, final)
        _barrier()
        if on_complete is not None:
            on_complete()

    if async_queue is None:
        with _removed_on_failure(tmp, final):
            faults.watch_save(tmp, meta["step"])
            dist_checkpointing.save(state, str(tmp))
            faults.maybe_kill("save", meta["step"], "after-write")  # the watch missed a quick write
            complete()
    else:
        with _removed_on_failure(tmp, final):
            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        finalizers = list(request.finalize_fns)  # megatron's: gather every rank's results, write .metadata

        def finalize() -> None:
            with _removed_on_failure(tmp, final):
                for finalizer in finalizers:
                    finalizer()
                complete()

        request.finalize_fns[:] = [finalize]
        async_queue.schedule_async_request(request)
        faults.maybe_kill("async_write", meta["step"])
    return final


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, final: Path) -> Iterator[None]:
    """A failed save leaves no hidden folder: every rank that sees the failure removes it, and a full disk is
    raised as the OSError of writing `final` (`full_disk_error`, decided before the removal frees the space).

    A CheckpointException comes on every rank at once (torch.distributed.checkpoint gathers the ranks' failures
    on the coordinator, rank 0, and raises on all), and only the coordinator's says what failed: the ranks take
    its word on a full disk and remove the folder once all of them are past the write. Any other error is this
    rank's alone, and waits for no other rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except BaseException as error:
        full = full_disk_error(error, final, look_at=tmp)
        if isinstance(error, CheckpointException):
            full = _coordinators_word(full, final)
            _barrier()
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from error
        raise


def _coordinators_word(full: Optional[OSError], final: Path) -> Optional[OSError]:
    """Rank 0's finding (a full disk or not) on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return full
    number = [full.errno if full is not None else 0]
    dist.broadcast_object_list(number, src=0)
    return OSError(number[0], os.strerror(number[0]), str(final)) if number[0] else None


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron (possibly chained) optimizer."""
    if hasattr(optimizer, "chained_optimizers"):
        return [inner for chained in optimizer.chained_optimizers for inner in _torch_optimizers(chained)]
    return [optimizer.optimizer]


@torch.no_grad()
def _materialise_adam_state(optimizer) -> None:
    """Give every parameter an Adam state (zero moments, step 0) before the first step.

    megatron builds the optimizer's load-time sharded state from the existing state, which torch's
    Adam creates only in its first step; the distributed optimizer asserts on the empty state.
    """
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {"step": torch.zeros((), dtype=torch.float32),
                                          "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}


@torch.no_grad()
def _unshare_adam_steps(optimizer) -> None:
    """megatron's distributed-optimizer load puts ONE step tensor in every parameter's state; torch's Adam
    increments it in place once per parameter, corrupting the bias correction. Give each its own copy."""
    for inner in _torch_optimizers(optimizer):
        for state in inner.state.values():
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].detach().clone()


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    members = getattr(optimizer, "chained_optimizers", [optimizer])
    return [member for member in members if isinstance(member, DistributedOptimizer)]


def _tolerate_missing_step(distributed) -> None:
    """megatron 0.16.1, fully-reshardable load with torch's Adam: the per-parameter copy walks the live
    state (which has `step`, set a moment earlier from the param groups) but the checkpoint tensors
    carry no `step` -> KeyError. Copy only what the checkpoint carries; `step` is already in place."""
    if getattr(distributed, "_cogvx_tolerant_step", False):
        return
    copy_states = distributed._set_main_param_and_optimizer_states

    def copy_present_states(model_param, tensors):
        group_index, group_order = distributed.model_param_group_index_map[model_param]
        main_param = distributed.optimizer.param_groups[group_index]["params"][group_order]
        missing = [key for key in distributed.optimizer.state[main_param] if key not in tensors]
        if not missing or distributed.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return copy_states(model_param, tensors)
        with torch.no_grad():
            main_param.copy_(tensors["param"])
            for key, value in distributed.optimizer.state[main_param].items():
                if key in tensors:
                    value.copy_(tensors[key])

    distributed._set_main_param_and_optimizer_states = copy_present_states
    distributed._cogvx_tolerant_step = True


def load_sharded_checkpoint(path: str | Path, model_chunks, optimizer=None,
                            keep: Optional[Callable[[str], bool]] = None, extra_state: Optional[dict] = None,
                            ema: bool = False) -> dict:
    """Load a torch_dist checkpoint into this rank's chunks (and optimizer) at the current layout; every
    rank reads only the shards its own parameters need. With `keep`, only those tensors (the rest of the
    chunks stays as it is). `extra_state`: more sharded tensors to read (saved as `save_sharded_checkpoint`'s);
    returns what was loaded of them. `ema`: the weight average saved beside the model goes into the chunks'
    parameters instead of the weights (weights only: no optimizer)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    model_state = model_sharded_state(model_chunks, keep)
    if ema:
        model_state = {chunk_key: {name: dataclasses.replace(value, key=EMA_PREFIX + value.key)
                                   for name, value in chunk_state.items() if isinstance(value, ShardedTensor)}
                       for chunk_key, chunk_state in model_state.items()}
    state = {**model_state, **(extra_state or {})}
    if optimizer is not None:
        _materialise_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=OPTIMIZER_METADATA)
    loaded = dist_checkpointing.load(state, str(path))
    chunks = [unwrap_model(chunk) for chunk in model_chunks]
    for key, chunk in zip(model_state, chunks):
        result = chunk.load_state_dict(loaded[key], strict=keep is None and not ema)
        if ema:
            result.missing_keys[:] = [k for k in result.missing_keys if not k.endswith("_extra_state")]
            if result.missing_keys or result.unexpected_keys:
                raise ConfigError("checkpoint", str(path), f"its weight average does not fit this model (missing "
                                                           f"{result.missing_keys[:3]})")
        if keep is not None and (result.unexpected_keys or [k for k in result.missing_keys if keep(k)]):
            raise ConfigError("checkpoint", str(path), f"does not fit this model (unexpected "
                                                       f"{result.unexpected_keys[:3]})")
    if optimizer is not None:
        for distributed in _distributed_optimizers(optimizer):
            _tolerate_missing_step(distributed)
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    return {key: loaded[key] for key in (extra_state or {})}


_LAYER_KEY = PROJECT_LAYER.format(i=0)[: -len("0.")]  # "decoder.layers."


def read_stored_tensors(path: str | Path, keys, missing_hint: str) -> dict[str, torch.Tensor]:
    """The whole tensors `keys` of a torch_dist checkpoint (global names, as stored), read into this process
    through torch.distributed.checkpoint's single-process load; one clear error when the checkpoint's
    metadata is unreadable or a key is not there (`missing_hint` says why that would be)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    try:
        stored = reader.read_metadata().state_dict_metadata
    except Exception as error:  # noqa: BLE001 - any unreadable .metadata is the same user-facing fault
        raise ConfigError("checkpoint", str(path), f"its torch_dist metadata cannot be read ({error}); the "
                                                   f"checkpoint is damaged") from None
    buffers: dict[str, torch.Tensor] = {}
    for key in keys:
        entry = stored.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise ConfigError("checkpoint", str(path), f"has no tensor {key!r}; {missing_hint}")
        buffers[key] = torch.empty(entry.size, dtype=entry.properties.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is not initialized: loading in one process" is the intent
        dcp.load(buffers, storage_reader=reader, no_dist=True)
    return buffers


def read_sharded_model_state(path: str | Path, meta: dict, ema: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The whole model of a torch_dist checkpoint saved at any layout, read into this process through
    torch.distributed.checkpoint's single-process load: no model is built and no process group is
    created or used. Returns project names (`decoder.layers.{i}.*`), the optimizer is not read. `ema`: the
    weight average saved beside the model (`training.ema`) instead of the weights."""
    model_config = model_config_from_dict(meta["model"])
    wanted = project_keys(model_config)
    per_layer = {key.split(".", 3)[3] for key in wanted if key.startswith(_LAYER_KEY)}
    prefix = EMA_PREFIX if ema else ""
    stored = read_stored_tensors(path, [prefix + k for k in wanted if not k.startswith(_LAYER_KEY)]
                                 + [prefix + _LAYER_KEY + rest for rest in per_layer],
                                 "it was not written for this model config (or is damaged)")
    buffers = {key[len(prefix):]: value for key, value in stored.items()}
    state = {key: value for key, value in buffers.items() if not key.startswith(_LAYER_KEY)}
    for rest in per_layer:
        stacked = buffers[_LAYER_KEY + rest]  # [num_layers, ...]
        for layer in range(model_config.num_layers):
            state[f"{_LAYER_KEY}{layer}.{rest}"] = stacked[layer].clone()
    return model_config, state
