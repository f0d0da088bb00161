"""The Checkpointer: everything a training run does with its checkpoints.

- Where a run starts (`plan_start`, before the model exists, on every rank): `--resume auto|DIR` (the newest
  checkpoint that verifies, damaged ones set aside), `--init-from` weights and a `--init-lora` file, the LoRA
  base the adapters point at; every check that can fail runs here, before anything is written.
- Saving: the step's sharded checkpoint (`checkpoint.sharded`, atomic, verified), every `training.save_interval`
  steps, every `training.save_every_minutes`, on an interrupt and once at the end, synchronous or in the background (`training.async_save`), the metadata a resume is
  checked against, pruning beyond `training.keep_checkpoints`; a LoRA run saves its adapters alone.
- Loading: model, optimizer and step of a training checkpoint saved at any layout.

The folders and their rules (step_<N>, repair, pruning, abandoned lines, the resume checks) are
`training.checkpoint`; this class holds what one run needs of them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from cogvx_mega.checkpoint.meta import SHARDED_FORMAT, read_checkpoint_meta
from cogvx_mega.checkpoint.sharded import load_sharded_checkpoint, save_sharded_checkpoint
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.schema import Config
from cogvx_mega.parallel.state import ParallelDims
from cogvx_mega.training import checkpoint as ckpt
from cogvx_mega.training.metrics import METRICS_FILE, REPLACED_FILE
from cogvx_mega.training.optimizer import use_fused_cpu_adam

logger = logging.getLogger(__name__)


def _clock() -> float:
    """Seconds on a clock that only goes forward (training.save_every_minutes)."""
    return time.monotonic()


@dataclass
class Start:
    """Where a run starts: a training checkpoint to resume (model, optimizer, step), or weights to initialise the
    model from (`init_from`, with `init_lora` merged), or neither (fresh weights)."""

    resume: Optional[Path] = None
    meta: Optional[dict] = None
    """The resumed checkpoint's metadata."""
    init_from: Optional[str] = None
    init_lora: Optional[str] = None
    lora_base: Optional[dict] = None
    """LoRA runs: {"base": path, "base_fingerprint": ..., "base_lora": path or None}, the weights the adapters
    are trained on (a resumed LoRA run loads them before its adapters)."""
    changes: list[str] = field(default_factory=list)
    """What a resume changes of the saved config (the allowed changes)."""

    @property
    def step(self) -> int:
        return int(self.meta["step"]) if self.meta else 0


class Checkpointer:
    def __init__(self, config: Config, dims: ParallelDims, run_dir: Optional[str] = None,
                 lora_base: Optional[dict] = None):
        self.config = config
        self.dims = dims
        self.run_dir = Path(run_dir or config.training.run_dir)
        self.lora_base = lora_base
        self.last_saved_step: Optional[int] = None  # the step of the newest checkpoint of this run (None: none)
        self._async_saves = None  # megatron's AsyncCallsQueue, created by the first asynchronous save
        self._last_save_time = _clock()  # for training.save_every_minutes (the logging rank's clock)

    # --- where a run starts --------------------------------------------------------------------------------
    def plan_start(self, resume: Optional[str], init_from: Optional[str], init_lora: Optional[str],
                   global_batch: int, verify: bool = True) -> Start:
        """The run's start, every check done (every rank calls it together; nothing is written but the repair of
        a replacement killed between its two renames, and damaged checkpoints set aside by `--resume auto`).
        With both `resume` and `init_from`, an existing checkpoint of the run wins (a requeued fine-tuning job
        continues); otherwise the run starts from the `init_from` weights, verified first (with every base under a
        LoRA checkpoint; `verify=False`: read as they are)."""
        config, lora = self.config, self.config.finetune.lora
        if init_lora is not None and init_from is None:
            raise ConfigError("--init-lora", init_lora, "a LoRA file is merged into base weights: pass --init-from BASE")
        if self.dims.is_logging_rank:
            ckpt.repair_checkpoints(self.run_dir)
        if dist.is_initialized():
            dist.barrier()
        path = ckpt.find_resume_checkpoint(resume, self.run_dir)
        if path is not None:
            meta = read_checkpoint_meta(path)
            self._check_training_checkpoint(meta, path)
            start = Start(resume=path, meta=meta, init_from=init_from,
                          changes=ckpt.check_resume_config(meta, config, global_batch, path))
            if lora and meta.get("lora"):
                from cogvx_mega.checkpoint.reader import check_lora_base

                if verify:
                    ckpt.verify_for_job(meta["lora"]["base"], flag="LoRA base")
                check_lora_base(meta["lora"], config.model, str(path))
                start.lora_base = {k: meta["lora"].get(k) for k in ("base", "base_fingerprint", "base_lora")}
            return start
        existing = ckpt.list_checkpoints(self.run_dir)
        if existing:
            raise ConfigError("--run-dir", str(self.run_dir), f"already holds checkpoints of a run (newest "
                                                              f"{existing[-1].name}); pass --resume auto to continue "
                                                              f"it, or use another --run-dir")
        if self.dims.is_logging_rank:
            self._say_no_checkpoint(resume)
        if lora and init_from is None:
            raise ConfigError("finetune.lora_rank", config.finetune.lora_rank, "LoRA adapts pretrained weights: pass "
                                                                             "--init-from BASE (a diffusers folder "
                                                                             "or a checkpoint)")
        start = Start(init_from=init_from, init_lora=init_lora)
        if init_from is not None:
            from cogvx_mega.checkpoint.lora import deltas_from_diffusers_lora
            from cogvx_mega.checkpoint.reader import base_fingerprint, open_transformer_weights

            if verify:
                ckpt.verify_for_job(init_from, flag="--init-from")
            weights = open_transformer_weights(init_from)
            ckpt.check_same_model({"model": dataclasses.asdict(weights.model)}, config.model, init_from,
                                  ignore=ckpt.NOT_IN_THE_WEIGHTS)
            if init_lora is not None:
                deltas_from_diffusers_lora(init_lora, config.model)  # a bad file fails here, before anything is written
            if lora:
                start.lora_base = {"base": os.path.abspath(init_from), "base_fingerprint": base_fingerprint(init_from),
                                   "base_lora": os.path.abspath(init_lora) if init_lora else None}
        return start

    def _say_no_checkpoint(self, resume: Optional[str]) -> None:
        """A run dir with metrics but no checkpoint (a run stopped before its first save) starts over at step 0,
        in one line that says so (its rows are moved aside when training starts, `training.metrics`)."""
        metrics = self.run_dir / METRICS_FILE
        if not metrics.is_file() or not metrics.stat().st_size:
            return
        asked = "--resume auto found" if resume == "auto" else "found"
        logger.warning("%s no checkpoint in %s, but metrics.jsonl of an earlier run that stopped before its first "
                       "save: starting over at step 0 (its rows move to %s)", asked, self.run_dir, REPLACED_FILE)

    def _check_training_checkpoint(self, meta: dict, path) -> None:
        """A training checkpoint of this model, not weights alone."""
        if meta.get("format") != SHARDED_FORMAT:
            raise ConfigError("--resume", str(path), "holds weights only (no optimizer state or step); start a run "
                                                     "from it with --init-from instead")
        ckpt.check_same_model(meta, self.config.model, path)

    def begin(self, start: Start) -> None:
        """After every check: a resume from an older checkpoint than the run's newest abandons the later ones
        (moved aside), and what the resume changes is said in one line (the logging rank)."""
        self.lora_base = start.lora_base
        if not self.dims.is_logging_rank or start.resume is None:
            return
        moved = ckpt.abandon_newer_checkpoints(self.run_dir, start.step)
        if moved is not None:
            logger.warning("resuming from step %d: the run's later checkpoints belong to another line now and were "
                           "moved to %s", start.step, moved)
        if start.changes:
            logger.info("resume changes %s", "; ".join(start.changes))

    # --- saving ------------------------------------------------------------------------------------------------
    def metadata(self, step: int, global_batch: int, data_state: Optional[dict] = None) -> dict:
        """What a checkpoint records beside the tensors: the model, the step, the position in the data (a global
        sample index), the data order's own state where it keeps one (`data_state`: the pack counts a packed run
        has planned, so a resume needs no re-planning) and the training setup a resume is checked against."""
        c, d = self.config, self.dims
        meta = {"step": step, "model": dataclasses.asdict(c.model), "preset": c.preset, "global_batch": global_batch,
                "consumed_samples": step * global_batch,
                "layout": {"tensor_model_parallel_size": d.tensor_model_parallel_size,
                           "pipeline_model_parallel_size": d.pipeline_model_parallel_size,
                           "context_parallel_size": d.context_parallel_size,
                           "data_parallel_size": d.data_parallel_size},
                "training": dataclasses.asdict(c.training), "diffusion": dataclasses.asdict(c.diffusion),
                "data": dataclasses.asdict(c.data), "finetune": dataclasses.asdict(c.finetune)}
        if c.finetune.lora:
            if self.lora_base is None:
                raise ValueError("a LoRA run saves adapters that point at their base: give the Checkpointer its "
                                 "lora_base")
            meta["lora"] = {**c.finetune.as_meta(), **self.lora_base}
        if data_state:
            meta["data_state"] = data_state
        return meta

    def trained_keys(self):
        """Which model tensors a checkpoint holds: all (None), or a LoRA run's adapters alone."""
        if not self.config.finetune.lora:
            return None
        from cogvx_mega.model.lora import is_lora_parameter

        return is_lora_parameter

    def save(self, step: int, ddp_chunks: list, optimizer, global_batch: int, data_state: Optional[dict] = None,
             ema=None) -> Path:
        """A sharded checkpoint of model, optimizer and step at run_dir/checkpoints/step_<N>/ (all ranks take part).

        With training.async_save the shards are written in the background and the folder appears when the save is
        finalized (`finalize`, called every step and at the end of training). One save is in flight at a time: a
        new save first waits for the previous one."""
        queue = None
        if self.config.training.async_save:
            self.finalize(blocking=True)
            if self._async_saves is None:
                from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

                self._async_saves = AsyncCallsQueue()
            queue = self._async_saves
        self.last_saved_step = step
        self._last_save_time = _clock()
        meta = self.metadata(step, global_batch, data_state)
        if ema is not None:
            meta["ema"] = {"decay": ema.decay, "start_step": ema.start_step}
        return save_sharded_checkpoint(ckpt.step_folder(self.run_dir, step), ddp_chunks, optimizer, meta,
                                       async_queue=queue, on_complete=self._prune, keep=self.trained_keys(),
                                       extra_state=ema.sharded_state() if ema is not None else None)

    def is_due(self, step: int) -> bool:
        """A periodic checkpoint at this step (`training.save_interval`; the last step saves at the end)."""
        interval = self.config.training.save_interval
        return bool(interval) and step % interval == 0 and step < self.config.training.steps

    def start_clock(self) -> None:
        """training.save_every_minutes counts from here (the start of training) and from every save."""
        self._last_save_time = _clock()

    def is_due_by_time(self) -> bool:
        """training.save_every_minutes have passed since the last save (or the start); this rank's clock, so the
        trainer asks the logging rank and every rank follows its answer."""
        minutes = self.config.training.save_every_minutes
        return bool(minutes) and _clock() - self._last_save_time >= 60.0 * minutes

    def _prune(self) -> None:
        if self.dims.is_logging_rank:  # runs after the save's closing barrier: every rank is past the old ones
            ckpt.prune_checkpoints(self.run_dir, self.config.training.keep_checkpoints)

    def finalize(self, blocking: bool = False) -> None:
        """Complete the asynchronous saves whose shards are written on every rank (all ranks call this)."""
        if self._async_saves is not None:
            self._async_saves.maybe_finalize_async_calls(blocking=blocking)

    # --- loading -----------------------------------------------------------------------------------------------
    def load(self, path, ddp_chunks: list, optimizer, ema=None) -> int:
        """Model and optimizer (and the weight average `ema`, when the checkpoint has one; else it starts at the
        loaded weights) from a training checkpoint saved at any layout; returns its step."""
        meta = read_checkpoint_meta(path)
        self._check_training_checkpoint(meta, path)
        if bool(meta.get("lora")) != self.config.finetune.lora:
            raise ConfigError("--resume", str(path), "a LoRA checkpoint resumes a LoRA run and a full checkpoint a full "
                                                     "run: keep finetune.lora_rank as it was saved")
        with_average = ema is not None and bool(meta.get("ema"))
        loaded = load_sharded_checkpoint(path, ddp_chunks, optimizer, keep=self.trained_keys(),
                                         extra_state=ema.sharded_state() if with_average else None)
        if with_average:
            ema.load(loaded)
        elif ema is not None:
            ema.reset_to_weights()
            if self.dims.is_logging_rank:
                logger.info("%s holds no weight average: training.ema_decay starts one at its weights", path)
        use_fused_cpu_adam(optimizer)
        self.last_saved_step = int(meta.get("step", 0))
        return self.last_saved_step
