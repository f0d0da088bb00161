"""A run's checkpoints: `<run_dir>/checkpoints/step_<N>/` folders in the torch-dist-v1 format
(`cogvx_mega.checkpoint.sharded`), which of them to resume from, and which to prune."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Optional

from cogvx_mega.checkpoint.atomic import repair_interrupted_swap
from cogvx_mega.checkpoint.meta import is_project_checkpoint
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.model import ModelConfig, RUNTIME_MODEL_FIELDS, model_config_from_dict

STEP_PREFIX = "step_"


def checkpoints_folder(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_folder(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_folder(run_dir) / f"{STEP_PREFIX}{step:08d}"


def step_of(folder: Path) -> int:
    return int(folder.name[len(STEP_PREFIX):])


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints of a run, oldest first (temporary folders are never listed)."""
    root = checkpoints_folder(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()
             and is_project_checkpoint(p)]
    return sorted(found, key=step_of)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# Model fields that are not properties of the weights: the backend, the VAE's latent scale (which a
# diffusers transformer folder does not carry) and the final LayerNorm's eps (SAT's 1e-6 on converted weights).
# Weights loaded with --init-from may differ in them.
NOT_IN_THE_WEIGHTS = ("backend", "latent_scale", "output_norm_eps")


def check_same_model(meta: dict, model_config: ModelConfig, path, ignore: tuple = RUNTIME_MODEL_FIELDS) -> None:
    saved = model_config_from_dict(meta["model"])
    mine = dataclasses.replace(model_config, **{name: getattr(saved, name) for name in ignore})
    if saved != mine:
        differing = [f.name for f in dataclasses.fields(ModelConfig) if getattr(saved, f.name) != getattr(mine, f.name)]
        raise ConfigError("checkpoint", str(path), f"it holds another model (differs in {', '.join(differing)}); "
                                                   f"use the model config it was trained with")


def repair_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Restore step folders whose replacement was killed between its two renames (see `checkpoint.atomic`);
    returns the restored folders. Call on one rank before anything reads the checkpoint list."""
    root = checkpoints_folder(run_dir)
    if not root.is_dir():
        return []
    names = {p.name.split(".old-")[0][1:] for p in root.iterdir() if p.name.startswith(f".{STEP_PREFIX}")
             and ".old-" in p.name}
    return [root / name for name in sorted(names) if repair_interrupted_swap(root / name)]


def find_resume_checkpoint(resume: Optional[str], run_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint `--resume` names, verified (`checkpoint.verify`: every file's size, and this rank's share
    of the checksums; every rank of the job calls this together).

    'auto' is the newest complete checkpoint of the run that verifies (None if it has none): a damaged one is
    reported in one warning line, moved aside into `checkpoints/damaged-step_<N>-<time>/` (never deleted) and
    the one before it is tried. An explicit folder that does not verify is one clear error."""
    from cogvx_mega.checkpoint.verify import verify_on_every_rank

    if resume is None:
        return None
    if resume != "auto":
        if not is_project_checkpoint(resume):
            raise ConfigError("--resume", resume, "no complete cogvx-mega checkpoint there; pass 'auto' or a "
                                                  "checkpoints/step_* folder")
        verdict = verify_on_every_rank(resume)
        if not verdict.ok:
            raise ConfigError("--resume", resume, f"the checkpoint is damaged ({verdict.problems[0]}); resume from "
                                                  f"an earlier one, or --resume auto to take the newest that verifies")
        return Path(resume)
    for folder in reversed(list_checkpoints(run_dir)):
        verdict = verify_on_every_rank(folder)
        if verdict.ok:
            return folder
        _set_aside_damaged(folder, verdict.problems)
    return None


def _set_aside_damaged(folder: Path, problems: list[str]) -> None:
    """Rank 0 moves a damaged checkpoint aside and says so in one line; every rank waits for it."""
    import logging

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = folder.parent / f"damaged-{folder.name}-{stamp}"
        os.replace(folder, target)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        logging.getLogger(__name__).warning("checkpoint %s is damaged: %s%s; moved to %s, resuming from the one "
                                            "before", folder.name, problems[0], more, target.name)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def abandon_newer_checkpoints(run_dir: str | os.PathLike, resumed_step: int) -> Optional[Path]:
    """Resuming from step k while the run has checkpoints after k starts a new line from k: the later ones
    belong to the abandoned line. They are moved (never deleted) into `checkpoints/abandoned-after-step_k-*/`,
    so pruning cannot delete the new line's checkpoints while keeping them and `--resume auto` never picks
    them. Returns the folder they went to (None if there were none)."""
    newer = [p for p in list_checkpoints(run_dir) if step_of(p) > resumed_step]
    if not newer:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = checkpoints_folder(run_dir) / f"abandoned-after-{STEP_PREFIX}{resumed_step:08d}-{stamp}"
    target.mkdir(parents=True, exist_ok=False)
    for folder in newer:
        os.replace(folder, target / folder.name)
    return target


# Fields a resumed run may change: they alter speed, bookkeeping or the optimisation from here on, never
# which samples, noise and timesteps a step sees. Anything else in these sections would continue another run.
RESUME_SAFE_FIELDS = {
    "training": {"steps", "lr", "min_lr", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                 "grad_clip", "device", "bf16", "recompute", "recompute_num_layers", "log_interval", "save_interval",
                 "save_every_minutes", "keep_checkpoints", "async_save", "run_dir", "micro_batch_size", "global_batch_size",
                 "mixed_precision", "sample_every", "tensorboard", "peak_tflops", "loss_spike_factor",
                 "loss_spike_window", "max_skipped_steps", "stop_file", "ema_decay", "ema_start_step",
                 "valid_every", "valid_samples", "valid_bins",
                 "hang_timeout_s", "straggler_factor"},  # a change of the optimizer's master weights is refused on its own
    "data": {"num_workers", "online_keep_clips", "valid"},
    "diffusion": set(),
    "finetune": set(),
}


def check_resume_config(meta: dict, config, global_batch: int, path) -> list[str]:
    """Compare the run's config with the one saved in the checkpoint. Returns the allowed changes as
    'section.field: old -> new' lines; raises ConfigError naming the first change that is not allowed (the
    global batch counts as changed when the number of samples per step differs, whatever gives it)."""
    changes, refused = [], []
    for section, safe in RESUME_SAFE_FIELDS.items():
        saved = meta.get(section)
        if saved is None:  # a checkpoint from before the config was recorded
            continue
        current = dataclasses.asdict(getattr(config, section))
        defaults = dataclasses.asdict(type(getattr(config, section))())  # a field newer than the checkpoint
        for name in sorted(set(saved) | set(current)):
            old, new = saved.get(name, defaults.get(name)), current.get(name)
            if old == new:
                continue
            (changes if name in safe else refused).append(f"{section}.{name}: {old!r} -> {new!r}")
    saved_training = meta.get("training")
    if saved_training is not None:
        from cogvx_mega.config.training import TrainingConfig

        known = {f.name for f in dataclasses.fields(TrainingConfig)}
        saved_precision = TrainingConfig(**{k: v for k, v in saved_training.items() if k in known}).precision()
        if (saved_precision == "bf16_params") != (config.training.precision() == "bf16_params"):
            refused.insert(0, f"precision: {saved_precision} -> {config.training.precision()} (the optimizer keeps "
                              f"fp32 master weights of bf16 parameters in one and not the other)")
    saved_batch = meta.get("global_batch")
    if saved_batch is not None and saved_batch != global_batch:
        refused.insert(0, f"global batch: {saved_batch} -> {global_batch} samples per step")
    if refused:
        raise ConfigError("--resume", str(path), f"the run changes {refused[0]}, which would continue another run "
                                                 f"(it decides the data order, noise or objective); keep the saved "
                                                 f"value, or start a new run from these weights with --init-from")
    return changes


def check_shared_filesystem(run_dir: str | os.PathLike) -> None:
    """Every rank must see the folder rank 0 writes checkpoints into (ranks on other nodes need a shared
    filesystem). Rank 0 writes a probe file; a rank that cannot read it back stops the run on every rank with
    one error naming it. A no-op on one process."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    folder = checkpoints_folder(run_dir)
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = folder / f".shared-filesystem-probe-{token[0]}"
    created = [p for p in (Path(run_dir), folder) if not p.exists()]  # removed again if the check fails
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    dist.barrier()
    try:
        sees = probe.read_text() == token[0]
    except OSError:
        sees = False
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (sees, socket.gethostname()))
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    missing = [rank for rank, (seen, _) in enumerate(views) if not seen]
    if missing:
        if dist.get_rank() == 0:
            for made in reversed(created):
                with contextlib.suppress(OSError):
                    made.rmdir()  # only if still empty
        hosts = sorted({views[rank][1] for rank in missing})
        raise ConfigError("training.run_dir", str(run_dir),
                          f"ranks {missing} (on {', '.join(hosts)}) cannot see the checkpoint folder rank 0 (on "
                          f"{views[0][1]}) writes: checkpoints of a multi-node run need a filesystem every node "
                          f"shares (NFS, Lustre, GPFS, ...); put --run-dir there")


def describe_run_checkpoints(run_dir: str | os.PathLike, checksums: bool = False) -> str:
    """`cogvx checkpoint list`: a table of a run's checkpoint folders (step, layout, size, state from the recorded
    sizes, or every CRC32C too with `checksums`), the damaged and abandoned ones set aside by resumes included."""
    from cogvx_mega.checkpoint.verify import describe, folder_bytes, verify_files

    root = checkpoints_folder(run_dir)
    if not root.is_dir():
        raise ConfigError("RUN_DIR", str(run_dir), "holds no checkpoints/ folder; pass a run folder (--run-dir)")
    header = ("folder", "step", "layout", "size", "state")
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name.startswith("abandoned-after-"):  # a line left by resuming an older checkpoint
            inner = sorted(p.name for p in folder.iterdir() if p.is_dir())
            rows.append((folder.name, "", "", "", f"abandoned line: {', '.join(inner)}"))
            continue
        verdict = verify_files(folder, checksum_share=(0, 1) if checksums else None)
        step, layout = describe(verdict.meta)
        state = "set aside by a resume (damaged)" if folder.name.startswith("damaged-") else verdict.state
        rows.append((folder.name, step, layout, f"{folder_bytes(folder) / 1e6:,.1f} MB", state))
    if not rows:
        return f"{root}: no checkpoints"
    widths = [max(len(str(row[i])) for row in [*rows, header]) for i in range(len(header))]
    lines = ["  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    if not checksums:
        lines.append("(sizes only: --checksums, or `cogvx checkpoint verify DIR`, also compares every CRC32C)")
    return "\n".join(lines)


def verify_for_job(folder: str | os.PathLike, flag: str = "checkpoint") -> None:
    """Verify a project checkpoint that every rank of a job reads, each rank checksumming its share of the files
    (`checkpoint.verify.verify_on_every_rank`); every rank raises the same one-line error when it is damaged. A
    LoRA checkpoint's bases are verified too. Every rank calls this together."""
    from cogvx_mega.checkpoint.reader import lora_chain
    from cogvx_mega.checkpoint.verify import refuse_damaged, verify_on_every_rank

    for path in lora_chain(folder):
        if is_project_checkpoint(path):
            refuse_damaged(path, verify_on_every_rank(path), flag=flag)
