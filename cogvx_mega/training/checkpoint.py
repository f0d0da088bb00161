"""Project checkpoints: a folder with `cogvx_checkpoint.json` (format, model config, step) and either
`model.safetensors` (format single-v1: megatron parameter names, unsharded; what the converters write)
or megatron torch_dist shards of model and optimizer (format torch-dist-v1: what training writes).

Every folder is written into a temporary sibling and renamed into place, so a reader never sees a
half-written checkpoint and a run killed mid-save keeps its previous one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..config.schema import ConfigError, ModelConfig, model_config_from_dict

FORMAT = "cogvx-mega/single-v1"
META_FILE = "cogvx_checkpoint.json"
MODEL_FILE = "model.safetensors"
STEP_PREFIX = "step_"


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` in one rename, on error it is removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and removed only afterwards, so
    a process killed at any point leaves one complete folder under `final`'s name or its hidden twin."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def is_project_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def save_project_checkpoint(path: str | os.PathLike, model_config: ModelConfig, state: dict,
                            step: int = 0, extra: Optional[dict] = None) -> Path:
    tensors = {k: v for k, v in state.items() if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}
    meta = {"format": FORMAT, "step": step, "model": dataclasses.asdict(model_config), **(extra or {})}
    return write_single_file_checkpoint(path, tensors, meta)


def write_single_file_checkpoint(path: str | os.PathLike, tensors: dict, meta: dict) -> Path:
    """model.safetensors + cogvx_checkpoint.json, atomically (the metadata is written last)."""
    from safetensors.torch import save_file

    with atomic_directory(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / MODEL_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return Path(path)


def read_project_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict, dict]:
    """(model config, tensors, metadata) of a project checkpoint folder."""
    from safetensors.torch import load_file

    folder = Path(path)
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise ConfigError("checkpoint", str(path), f"no {META_FILE} there; pass a cogvx-mega checkpoint folder "
                                                   f"(or a diffusers transformer folder)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") == SHARDED_FORMAT:
        return _gather_sharded_model(folder, meta)
    if meta.get("format") != FORMAT:
        raise ConfigError("checkpoint", str(path), f"format {meta.get('format')!r} is not {FORMAT!r}")
    return model_config_from_dict(meta["model"]), load_file(str(folder / MODEL_FILE)), meta


def _gather_sharded_model(folder: Path, meta: dict) -> tuple[ModelConfig, dict, dict]:
    """The whole model of a torch_dist checkpoint, loaded into one process (any saved layout)."""
    from ..model.transformer import build_model
    from ..parallel.state import initialize_parallel

    model_config = model_config_from_dict(meta["model"])
    initialize_parallel(device="cpu")
    model = build_model(model_config, device="cpu")
    load_sharded_checkpoint(folder, [model])
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return model_config, state, meta


def step_folder(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints of a run, oldest first (temporary folders are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and is_project_checkpoint(p)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --- sharded training checkpoints (megatron dist_checkpointing, torch_dist) ------------------------------

SHARDED_FORMAT = "cogvx-mega/torch-dist-v1"
# Optimizer state saved so that it reloads at any TP/PP/CP/DP layout (megatron's default for the
# distributed optimizer in 0.16.1 raises "flattened_range is not supported").
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _model_sharded_state(model_chunks) -> dict:
    """{'model': ...} for one chunk, {'model0': ..., 'model1': ...} for virtual pipeline chunks.

    Tensors are keyed by their global names, so the nesting does not tie a checkpoint to a layout.
    """
    chunks = [getattr(chunk, "module", chunk) for chunk in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_sharded_checkpoint(path: str | os.PathLike, model_chunks, optimizer, step: int, model_config: ModelConfig,
                            extra: Optional[dict] = None, async_queue=None,
                            on_complete: Optional[Callable[[], None]] = None) -> Path:
    """Every rank writes its shards into a hidden temporary folder; rank 0 then adds the metadata (which
    marks the checkpoint complete) and renames it into place. A run killed mid-save leaves only the
    temporary folder, which no reader lists and the next save of that step replaces.

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
    model_state = _model_sharded_state(model_chunks)
    state = {**model_state, "step": step,
             "optimizer": optimizer.sharded_state_dict(model_state, is_loading=False, metadata=OPTIMIZER_METADATA)}

    def complete() -> None:
        _barrier()
        if is_writer:
            meta = {"format": SHARDED_FORMAT, "step": step, "model": dataclasses.asdict(model_config), **(extra or {})}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            swap_into_place(tmp, final)
        _barrier()
        if on_complete is not None:
            on_complete()

    if async_queue is None:
        dist_checkpointing.save(state, str(tmp))
        complete()
    else:
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        request.add_finalize_fn(complete)
        async_queue.schedule_async_request(request)
    return final


def check_same_model(meta: dict, model_config: ModelConfig, path) -> None:
    saved = model_config_from_dict(meta["model"])
    mine = dataclasses.replace(model_config, backend=saved.backend)
    if saved != mine:
        differing = [f.name for f in dataclasses.fields(ModelConfig) if getattr(saved, f.name) != getattr(mine, f.name)]
        raise ConfigError("checkpoint", str(path), f"it holds another model (differs in {', '.join(differing)}); "
                                                   f"resume with the config it was trained with")


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


def load_sharded_checkpoint(path: str | os.PathLike, model_chunks, optimizer=None) -> dict:
    """Load a torch_dist checkpoint into this rank's chunks (and optimizer) at the current layout."""
    from megatron.core import dist_checkpointing

    meta = json.loads((Path(path) / META_FILE).read_text())
    model_state = _model_sharded_state(model_chunks)
    state = dict(model_state)
    if optimizer is not None:
        _materialise_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=OPTIMIZER_METADATA)
    loaded = dist_checkpointing.load(state, str(path))
    chunks = [getattr(chunk, "module", chunk) for chunk in model_chunks]
    for key, chunk in zip(model_state, chunks):
        chunk.load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        for distributed in _distributed_optimizers(optimizer):
            _tolerate_missing_step(distributed)
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    return meta


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise ConfigError("checkpoint", str(path), f"no {META_FILE} there; pass a complete cogvx-mega checkpoint")
    return json.loads(meta_file.read_text())
