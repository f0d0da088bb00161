"""Project checkpoints: a folder with `cogvx_checkpoint.json` (format, model config, step) and
`model.safetensors` (megatron parameter names, unsharded), plus optimizer/trainer state for training.

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
from typing import Iterator, Optional

import torch

from ..config.schema import ConfigError, ModelConfig, model_config_from_dict

FORMAT = "cogvx-mega/single-v1"
META_FILE = "cogvx_checkpoint.json"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer_state.pt"
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
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_project_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def save_project_checkpoint(path: str | os.PathLike, model_config: ModelConfig, state: dict,
                            step: int = 0, trainer_state: Optional[dict] = None, extra: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()
               if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}
    meta = {"format": FORMAT, "step": step, "model": dataclasses.asdict(model_config), **(extra or {})}
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / MODEL_FILE))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))  # written last: marks the folder complete
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
    if meta.get("format") != FORMAT:
        raise ConfigError("checkpoint", str(path), f"format {meta.get('format')!r} is not {FORMAT!r}")
    return model_config_from_dict(meta["model"]), load_file(str(folder / MODEL_FILE)), meta


def read_trainer_state(path: str | os.PathLike) -> Optional[dict]:
    file = Path(path) / TRAINER_FILE
    return torch.load(file, map_location="cpu", weights_only=False) if file.is_file() else None


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
