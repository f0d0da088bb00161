"""A VAE training run (`cogvx vae train`): every check before anything is written (config, data, layout,
--init-from, --resume), the plan of `--dry-run`, then the loop of `training.vae_trainer.VAETrainer` steps with
a metrics.jsonl row per step and checkpoints every `vae_train.save_interval` steps and at the end."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from cogvx_mega.checkpoint.atomic import write_text_atomically
from cogvx_mega.config.errors import ConfigError, refuse_existing_output
from cogvx_mega.data.vae_clips import VAETrainingClips
from cogvx_mega.training import checkpoint as ckpt
from cogvx_mega.training.interrupts import TrainingInterrupted, catch_interrupts
from cogvx_mega.training.metrics import METRICS_FILE, append_whole, set_aside_rows_after
from cogvx_mega.training.vae_trainer import VAETrainer, build_layout, check_init_from, check_resume, plan_layout
from cogvx_mega.training.watchdog import HangWatchdog
from cogvx_mega.vae.discriminator import Discriminator3D
from cogvx_mega.vae.model import CogVideoXVAE
from cogvx_mega.vae.train_config import VAERunConfig

logger = logging.getLogger(__name__)


def describe_plan(config: VAERunConfig, clips, blocks: list, world_size: int, cp: int) -> str:
    """What `cogvx vae train --dry-run` prints: the run's layout, data and model sizes."""
    t = config.vae_train
    with torch.device("meta"):
        vae_params = sum(p.numel() for p in CogVideoXVAE(config.vae).parameters())
        disc_params = sum(p.numel() for p in Discriminator3D(dim=t.disc_dim, image_size=t.size,
                                                             frame_num=t.disc_frames(),
                                                             max_dim=t.disc_max_dim).parameters())
    per_rank = ", ".join(f"rank {r}: frames {v0}..{v0 + v - 1} (latent {l0}..{l0 + n - 1})"
                         for r, (v0, v, l0, n) in enumerate(blocks))
    lines = [f"vae train plan (preset {config.preset})",
             f"  layout: {world_size} ranks = data parallel {world_size // cp} x context parallel {cp}; {per_rank}",
             f"  clips: {len(clips)} usable, {clips.left_out} left out (too short at every fps); {t.frames} frames at "
             f"{t.size}x{t.size}, fps from {t.fps_choices}",
             f"  batch: {t.global_batch_size} clips per step, {t.global_batch_size // (world_size // cp)} per replica; "
             f"steps {t.steps}",
             f"  VAE {vae_params:,} parameters; discriminator {disc_params:,} (frame_num {t.disc_frames()}, GAN from "
             f"step {config.loss.gan_start_step}); LPIPS {'on' if config.loss.perceptual_weight > 0 else 'off'}"]
    return "\n".join(lines)


def train_vae(config: VAERunConfig, data: str, run_dir: str, cp: int = 1, resume: Optional[str] = None,
              init_from: Optional[str] = None, steps: Optional[int] = None, dry_run: bool = False) -> dict:
    """Train; returns the last step's metrics row. Every check runs before anything is written. `dry_run`: the
    checks and the plan (printed), nothing trained or written."""
    if steps is not None:
        config.vae_train.steps = steps
        config.validate()
    t = config.vae_train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    blocks = plan_layout(config, cp, world_size)
    run_path = Path(run_dir)
    if run_path.exists() and not run_path.is_dir():
        refuse_existing_output("--run-dir", run_dir, overwrite=False, what="folder")
    device = t.device or ("cuda" if torch.cuda.is_available() else "cpu")
    clips = VAETrainingClips(data, t.frames, t.size, t.fps_choices, config.vae.temporal_compression_ratio, t.seed,
                             t.random_start)
    if config.loss.perceptual_weight > 0:
        for name in ("lpips_vgg", "lpips_lin"):
            if not Path(getattr(t, name)).is_file():
                raise ConfigError(f"vae_train.{name}", getattr(t, name), "no such file; LPIPS reads its weights from "
                                                                        "disk (nothing is downloaded)")
    if init_from is not None:
        check_init_from(init_from, config)
    if resume is None and ckpt.list_checkpoints(run_path):
        raise ConfigError("--run-dir", run_dir, f"already holds checkpoints of a run (newest "
                                                f"{ckpt.list_checkpoints(run_path)[-1].name}); pass --resume auto to "
                                                f"continue it, or use another --run-dir")
    if not run_path.exists():
        refuse_existing_output("--run-dir", run_dir, overwrite=False, what="folder")  # its parent takes a folder
    if dry_run:
        print(describe_plan(config, clips, blocks, world_size, cp))
        return {}
    layout, cp_group, grad_group = build_layout(config, cp, device)
    if layout.dims.is_logging_rank:
        ckpt.repair_checkpoints(run_path)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    resume_path = ckpt.find_resume_checkpoint(resume, run_path)
    changes: list[str] = []
    if resume_path is not None:
        changes = check_resume(json.loads((resume_path / "cogvx_checkpoint.json").read_text()), config, resume_path)
    elif ckpt.list_checkpoints(run_path):  # --resume auto found none that verifies, yet some are listed
        raise ConfigError("--resume", resume, "no checkpoint of the run verifies; start another --run-dir")

    trainer = VAETrainer(config, clips, layout, cp_group, grad_group, device)
    start = 0
    if resume_path is not None:
        start = trainer.load(resume_path)
    elif init_from is not None:
        trainer.init_from(init_from)

    if layout.dims.is_logging_rank:
        run_path.mkdir(parents=True, exist_ok=True)
        write_text_atomically(run_path / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        if resume_path is not None:
            ckpt.abandon_newer_checkpoints(run_path, start)
        set_aside_rows_after(run_path, start)  # rows of a run that went on past its last checkpoint (or had none)
        logger.info("vae train: %d clips (%d left out: too short at every fps), %d ranks (data %d x context %d), "
                    "steps %d..%d%s", len(clips), clips.left_out, layout.dims.world_size, layout.dims.data_parallel_size,
                    cp, start + 1, t.steps, f", resumed from {resume_path.name}" if resume_path else "")
        for change in changes:
            logger.info("resume changes %s", change)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

    row: dict = {}
    began = time.perf_counter()
    watchdog = HangWatchdog(t.hang_timeout_s, layout.dims.rank, label="VAE training", run_dir=run_path,
                            setting="vae_train.hang_timeout_s").start(start)
    with catch_interrupts() as interrupts, watchdog:  # leaving the block stops the watchdog
        for step in range(start, t.steps):
            row = trainer.train_step(step)
            watchdog.beat(step + 1)
            row["skipped_clips"] = clips.skipped  # this rank's replica's (the logging rank's)
            row["samples_per_s"] = t.global_batch_size * (step + 1 - start) / (time.perf_counter() - began)
            if layout.dims.is_logging_rank:
                append_whole(run_path / METRICS_FILE, json.dumps(row) + "\n")
                if (step + 1) % t.log_interval == 0 or step + 1 == t.steps:
                    logger.info("step %d/%d | loss %.4f | recon %.4f | kl %.1f | lpips %.4f | gan %.4f | disc %.4f "
                                "| grad_norm %.3f", step + 1, t.steps, row["loss"], row["recon_loss"], row["kl_loss"],
                                row["perceptual_loss"], row["gan_loss"], row["disc_loss"], row["grad_norm"])
            signal_number = agreed_signal(interrupts.signal_number, trainer.device)
            if (step + 1) % t.save_interval == 0 or step + 1 == t.steps or signal_number:
                with watchdog.paused():
                    saved = trainer.save(run_path, step + 1)
            if signal_number:
                raise TrainingInterrupted(signal_number, step + 1, saved)
    return row


def agreed_signal(local: int, device: torch.device) -> int:
    """The signal any rank noted during the step (0: none), so that every rank saves and stops together."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local
    vote = torch.tensor([float(local)], device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return int(vote.item())
