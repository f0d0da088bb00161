"""The VAE trainer of `cogvx vae train` (the run around it: `run/vae_training.py`): the 3D causal VAE trained
with L1 (or MSE) + LPIPS + KL and a hinge GAN, data parallel x context parallel over time.

Layout. The process groups come from `parallel.state.initialize_parallel` (megatron's), as for the
transformer: `--cp N` ranks split each clip's time axis (the halo exchange and the distributed GroupNorm of
`vae.time_split`, forward and backward); the remaining factor of the world is data parallel. Every rank holds
the whole VAE and discriminator.

One step (every rank):
1. the replica's clips (global sample slots `step * G + dp_rank * G/DP + i`, `VAETrainingClips`), this rank's
   block of frames encoded, a posterior draw with noise keyed on the slot (the whole clip's noise, this rank's
   frames of it) decoded;
2. this rank's share of the generator loss (`VAELoss`, `ClipShard`), backward; the VAE's gradients summed over
   the CP group and averaged over replicas (one all-reduce over the data x context group), clipped, AdamW;
3. once the GAN is on, the discriminator's hinge loss on this rank's windows of the real and reconstructed
   clips (its share, `VAELoss.discriminator_loss`), its gradients summed over CP and averaged over replicas the
   same way, its own AdamW.
So a step gives the one-process numbers at any layout (tests/distributed/test_vae_training.py).

Checkpoints (`checkpoints/step_<N>/`, format vae-train-v1): the VAE, the discriminator, both optimizers and
the config, written by rank 0 atomically with every file's CRC32C, resumed with `--resume auto` (the newest
that verifies) at any layout; data order and noise are arithmetic on (seed, slot), so nothing else is saved.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors.torch import load_file

from cogvx_mega.checkpoint import faults
from cogvx_mega.checkpoint.meta import VAE_TRAINING_FORMAT, is_project_checkpoint, read_checkpoint_meta
from cogvx_mega.checkpoint.vae import (DISCRIMINATOR_FILE, read_vae_config, read_vae_training_checkpoint,
                                       read_vae_weights, save_vae_training_checkpoint)
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.parallel import ParallelConfig
from cogvx_mega.diffusion.randomness import Stream, slot_generator
from cogvx_mega.parallel.state import ParallelDims, initialize_parallel
from cogvx_mega.training import checkpoint as ckpt
from cogvx_mega.vae.discriminator import Discriminator3D
from cogvx_mega.vae.losses import ClipShard, VAELoss, last_decoder_layer
from cogvx_mega.vae.lpips import LPIPS, pick_frames
from cogvx_mega.vae.model import CogVideoXVAE, video_ranges
from cogvx_mega.vae.time_split import ContextParallelTime, TimeSplit, VAEInputError, shard_sizes
from cogvx_mega.vae.train_config import (RESUME_SAFE_VAE_TRAIN_FIELDS, VAERunConfig, architecture_differences,
                                         run_config_from_dict)

logger = logging.getLogger(__name__)


# --- where this rank's frames lie -------------------------------------------------------------------------


@dataclass(frozen=True)
class VAELayout:
    """Where this rank sits (`dims`, the transformer's `ParallelDims`) and which frames of each clip it holds."""

    dims: ParallelDims
    context_parallel_rank: int
    video_start: int
    video_frames: int
    latent_start: int
    latent_frames: int
    clip_frames: int
    clip_latent_frames: int


def time_blocks(frames: int, ratio: int, cp: int) -> list[tuple[int, int, int, int]]:
    """(video start, video frames, latent start, latent frames) of each CP rank for a clip of `frames` frames;
    a ConfigError when the clip cannot be split that many ways."""
    latent_frames = 1 + (frames - 1) // ratio
    try:
        sizes = shard_sizes(latent_frames, cp)
    except VAEInputError:
        most = max(1, (latent_frames - latent_frames % 2) // 2)
        raise ConfigError("--cp", cp, f"vae_train.frames={frames} gives {latent_frames} latent frames and every "
                                      f"context-parallel rank needs at least 2 of them; use --cp {most} or less, or "
                                      f"more frames") from None
    latent_starts = [sum(sizes[:rank]) for rank in range(cp)]
    return [(video_start, video, latent_start, count) for (video_start, video), latent_start, count
            in zip(video_ranges(sizes, ratio), latent_starts, sizes)]


def plan_layout(config: VAERunConfig, cp: int, world_size: int) -> list[tuple[int, int, int, int]]:
    """Every layout check that needs no process group (run before anything is written)."""
    if cp < 1:
        raise ConfigError("--cp", cp, "use a positive context-parallel size")
    blocks = time_blocks(config.vae_train.frames, config.vae.temporal_compression_ratio, cp)
    if world_size % cp:
        raise ConfigError("--cp", cp, f"it must divide the world size ({world_size} ranks; launch with torchrun "
                                      f"--nproc-per-node a multiple of {cp})")
    frame_num = config.vae_train.disc_frames()
    judged = [count - (1 if start == 0 and config.vae_train.frames % 2 else 0) for start, count, _, _ in blocks]
    if any(count % frame_num for count in judged):
        fits = math.gcd(*judged) & -math.gcd(*judged)  # the largest power of two dividing every rank's count
        raise ConfigError("vae_train.disc_frame_num", config.vae_train.disc_frame_num,
                          f"the discriminator judges windows of {frame_num} frames and each of the {cp} context-"
                          f"parallel ranks must hold whole windows (their frames after frame 0: {judged}); set "
                          f"vae_train.disc_frame_num={fits}")
    dp = world_size // cp
    if config.vae_train.global_batch_size % dp:
        raise ConfigError("vae_train.global_batch_size", config.vae_train.global_batch_size,
                          f"use a multiple of the data-parallel size {dp} (world {world_size} / cp {cp})")
    return blocks


def build_layout(config: VAERunConfig, cp: int, device: str):
    """(VAELayout, CP group or None, data x context group or None) from megatron's process groups."""
    blocks = plan_layout(config, cp, int(os.environ.get("WORLD_SIZE", "1")))
    dims = initialize_parallel(ParallelConfig(context_parallel_size=cp), device=device, seed=config.vae_train.seed)
    cp_rank = parallel_state.get_context_parallel_rank()
    video_start, video_frames, latent_start, latent_frames = blocks[cp_rank]
    layout = VAELayout(dims=dims, context_parallel_rank=cp_rank, video_start=video_start, video_frames=video_frames,
                       latent_start=latent_start, latent_frames=latent_frames, clip_frames=config.vae_train.frames,
                       clip_latent_frames=sum(b[3] for b in blocks))
    cp_group = parallel_state.get_context_parallel_group() if cp > 1 else None
    grad_group = parallel_state.get_data_parallel_group(with_context_parallel=True) if dims.world_size > 1 else None
    return layout, cp_group, grad_group


# --- the trainer ------------------------------------------------------------------------------------------


class VAETrainer:
    """Model, discriminator, losses, optimizers and the step; `train_vae` runs it."""

    def __init__(self, config: VAERunConfig, clips, layout: VAELayout, cp_group=None, grad_group=None,
                 device: str = "cpu"):
        self.config, self.clips, self.layout = config, clips, layout
        self.cp_group, self.grad_group, self.device = cp_group, grad_group, torch.device(device)
        self.step = 0  # the step being computed (a key of its random draws)
        t = config.vae_train
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.vae = CogVideoXVAE(config.vae).to(self.device)
        self.discriminator = Discriminator3D(dim=t.disc_dim, image_size=t.size, frame_num=t.disc_frames(),
                                             max_dim=t.disc_max_dim).to(self.device)
        self.discriminator.requires_grad_(False)  # trainable only inside its own step
        lpips = None
        if config.loss.perceptual_weight > 0:
            lpips = LPIPS.from_files(t.lpips_vgg, t.lpips_lin).to(self.device)
        self.loss = VAELoss(config.loss, lpips=lpips, discriminator=self.discriminator)
        betas = (t.adam_beta1, t.adam_beta2)
        self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=t.lr, betas=betas, weight_decay=t.weight_decay)
        self.disc_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=t.disc_lr, betas=betas,
                                                weight_decay=t.weight_decay)

    # --- pieces of a step ---------------------------------------------------------------------------------
    def slots(self, step: int) -> list[int]:
        """The global sample slots this rank's replica reads at `step`."""
        g = self.config.vae_train.global_batch_size
        local = g // self.layout.dims.data_parallel_size
        first = step * g + self.layout.dims.data_parallel_rank * local
        return list(range(first, first + local))

    def read_batch(self, step: int) -> tuple[torch.Tensor, list]:
        videos, draws = zip(*(self.clips.read(slot) for slot in self.slots(step)))
        dtype = next(self.vae.parameters()).dtype
        return torch.stack(videos).to(self.device, dtype), list(draws)

    def posterior_noise(self, slots: list[int], like: torch.Tensor) -> torch.Tensor:
        """Noise for the posterior draw: the whole clip's [C, T', h, w] per slot (keyed), this rank's frames."""
        c, _, h, w = like.shape[1:]
        layout = self.layout
        rows = []
        for slot in slots:
            generator = slot_generator(self.config.vae_train.seed, self.step, slot, Stream.VAE_TRAINING_POSTERIOR)
            noise = torch.randn(c, layout.clip_latent_frames, h, w, generator=generator)
            rows.append(noise[:, layout.latent_start:layout.latent_start + layout.latent_frames])
        return torch.stack(rows).to(like.device, like.dtype)

    def lpips_frames(self, slots: list[int]) -> Optional[torch.Tensor]:
        """[B, k] clip frames LPIPS compares (keyed on the slot), or None for all frames."""
        k = self.config.loss.lpips_frames
        if k is None or self.config.loss.perceptual_weight == 0:
            return None
        seed = self.config.vae_train.seed
        return torch.cat([pick_frames(1, self.layout.clip_frames, k, slot_generator(
            seed, self.step, slot, Stream.VAE_TRAINING_LPIPS_FRAMES)) for slot in slots])

    def time_split(self, frames: int):
        impl = self.config.vae_train.conv_impl
        if self.cp_group is None:
            return TimeSplit(frames=frames, conv_impl=impl)
        return ContextParallelTime(frames=frames, conv_impl=impl, group=self.cp_group)

    def clip_shard(self):
        layout = self.layout
        return ClipShard(frame_offset=layout.video_start, clip_frames=layout.clip_frames,
                         reduce_grads=lambda grads: self.reduce(grads, divide_by=layout.dims.data_parallel_size))

    def reduce(self, tensors, divide_by: int) -> list[torch.Tensor]:
        """Sum over the data x context group, divided by `divide_by` (one all-reduce of a flat buffer)."""
        tensors = list(tensors)
        if self.grad_group is None:
            return [t / divide_by for t in tensors] if divide_by != 1 else tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.grad_group)
        flat /= divide_by
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    def reduce_gradients(self, module: torch.nn.Module, divide_by: int) -> None:
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for p, reduced in zip(params, self.reduce([p.grad for p in params], divide_by)):
            p.grad.copy_(reduced)

    def learning_rate(self, base: float, step: int) -> float:
        warmup = self.config.vae_train.warmup_steps
        return base * min(1.0, (step + 1) / warmup) if warmup else base

    def clip_and_step(self, module, optimizer, base_lr: float, step: int) -> float:
        clip = self.config.vae_train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(list(module.parameters()), clip if clip > 0 else math.inf)
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(base_lr, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # --- the step -----------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        """One optimisation step of the VAE (and the discriminator once the GAN is on); the row metrics.jsonl
        gets: every term of the whole batch (the same on every rank)."""
        layout, config = self.layout, self.config
        self.step = step
        self.vae.train()
        slots = self.slots(step)
        video, draws = self.read_batch(step)
        local_video = video[:, :, layout.video_start:layout.video_start + layout.video_frames]
        moments = self.vae.encoder(local_video, self.time_split(layout.clip_frames))
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        latents = mean + torch.exp(0.5 * logvar) * self.posterior_noise(slots, mean) \
            if config.vae_train.sample_posterior else mean
        reconstruction = self.vae.decoder(latents, self.time_split(layout.clip_latent_frames))
        shard = self.clip_shard()
        gan_on = self.loss.gan_active(step)
        terms = self.loss.generator_loss(local_video, reconstruction, mean, logvar, step,
                                         last_layer=last_decoder_layer(self.vae),
                                         picked_frames=self.lpips_frames(slots), shard=shard)
        terms.loss.backward()
        faults.maybe_kill("step", step + 1)
        self.reduce_gradients(self.vae, divide_by=layout.dims.data_parallel_size)
        grad_norm = self.clip_and_step(self.vae, self.optimizer, config.vae_train.lr, step)

        disc_grad_norm = 0.0
        if gan_on:
            self.discriminator.requires_grad_(True)
            disc_terms = self.loss.discriminator_loss(local_video, reconstruction.detach(), step, shard)
            disc_terms.loss.backward()
            self.reduce_gradients(self.discriminator, divide_by=layout.dims.data_parallel_size)
            disc_grad_norm = self.clip_and_step(self.discriminator, self.disc_optimizer, config.vae_train.disc_lr, step)
            self.discriminator.requires_grad_(False)
            disc_loss, r1 = disc_terms.disc_loss, disc_terms.r1_penalty
        else:
            disc_loss = r1 = video.new_zeros(())
        # the logged terms of the whole batch: shares summed over CP, replicas averaged
        dp, cp = layout.dims.data_parallel_size, layout.dims.context_parallel_size
        shares = self.reduce([terms.recon_loss, terms.kl_loss, terms.perceptual_loss, terms.gan_loss,
                              torch.as_tensor(disc_loss), torch.as_tensor(r1)], divide_by=dp)
        recon, kl, perceptual, gan, disc, r1_value = (float(x) for x in shares)
        weight = float(self.reduce([terms.adaptive_weight], divide_by=dp * cp)[0])  # the same on every rank
        c = config.loss
        loss = recon + c.perceptual_weight * perceptual + c.kl_weight * kl + weight * gan
        return {"step": step + 1, "loss": loss, "recon_loss": recon, "kl_loss": kl, "perceptual_loss": perceptual,
                "gan_loss": gan, "disc_loss": disc, "adaptive_weight": weight, "r1_penalty": r1_value,
                "grad_norm": grad_norm, "disc_grad_norm": disc_grad_norm, "gan_on": gan_on,
                "lr": self.learning_rate(config.vae_train.lr, step),
                "fps": [d.fps for d in draws] if dp == 1 else None}

    # --- checkpoints --------------------------------------------------------------------------------------
    def save(self, run_dir: Path, step: int) -> Optional[Path]:
        path = ckpt.step_folder(run_dir, step)
        if self.layout.dims.is_logging_rank:
            save_vae_training_checkpoint(
                path, self.vae.state_dict(), self.config.vae, {"step": step, "run": self.config.to_dict()},
                self.discriminator.state_dict(),
                {"vae": self.optimizer.state_dict(), "discriminator": self.disc_optimizer.state_dict()})
            ckpt.prune_checkpoints(run_dir, self.config.vae_train.keep_checkpoints)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return path

    def load(self, path: Path) -> int:
        meta, vae_state, disc_state, optimizers = read_vae_training_checkpoint(path)
        self.vae.load_state_dict(vae_state)
        if disc_state is not None:
            self.discriminator.load_state_dict(disc_state)
        self.optimizer.load_state_dict(optimizers["vae"])
        self.disc_optimizer.load_state_dict(optimizers["discriminator"])
        return int(meta["step"])

    def init_from(self, path: str) -> None:
        """The VAE's weights (and the discriminator's, when a training checkpoint of the same shapes has one)."""
        vae_config, state, disc_state = read_init_weights(path)
        self.vae.load_state_dict(state)
        if disc_state is not None:
            mine = self.discriminator.state_dict()
            if all(k in disc_state and disc_state[k].shape == v.shape for k, v in mine.items()):
                self.discriminator.load_state_dict(disc_state)
            elif self.layout.dims.is_logging_rank:
                logger.info("the discriminator of %s has other shapes (another frame count or size): it starts "
                            "fresh", path)


def read_init_weights(path: str):
    """(VAE config, VAE state, discriminator state or None) of a diffusers VAE folder, a VAE checkpoint or a VAE
    training checkpoint; verified first."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError("--init-from", path, "no such folder; pass a diffusers AutoencoderKLCogVideoX folder, a "
                                               "cogvx-mega VAE checkpoint or a vae train checkpoints/step_* folder")
    config, state = read_vae_weights(path)
    disc = None
    if is_project_checkpoint(folder) and read_checkpoint_meta(path).get("format") == VAE_TRAINING_FORMAT \
            and (folder / DISCRIMINATOR_FILE).is_file():
        disc = load_file(str(folder / DISCRIMINATOR_FILE))
    return config, state, disc


# --- checks before a run ---------------------------------------------------------------------------------


def check_resume(meta: dict, config: VAERunConfig, path: Path) -> list[str]:
    """What the resumed run changes of the saved config (only `RESUME_SAFE_VAE_TRAIN_FIELDS` may change)."""
    saved = run_config_from_dict(meta["run"]).to_dict()
    mine = config.to_dict()
    changes, refused = [], []
    for section in ("preset", "vae", "loss", "vae_train"):
        a, b = saved[section], mine[section]
        if section == "preset":
            if a != b:
                refused.append(f"preset {a} -> {b}")
            continue
        for name in a:
            if a[name] != b[name]:
                (changes if section == "vae_train" and name in RESUME_SAFE_VAE_TRAIN_FIELDS else refused).append(
                    f"{section}.{name} {a[name]!r} -> {b[name]!r}")
    if refused:
        raise ConfigError("--resume", str(path), f"the run was trained with another config ({'; '.join(refused)}); "
                                                 f"resume with the config it was saved with, or start a new --run-dir")
    return changes


def check_init_from(path: str, config: VAERunConfig) -> None:
    """The --init-from VAE has the architecture of the run's preset (before anything is written)."""
    if not Path(path).is_dir():
        raise ConfigError("--init-from", path, "no such folder; pass a diffusers AutoencoderKLCogVideoX folder, a "
                                               "cogvx-mega VAE checkpoint or a vae train checkpoints/step_* folder")
    vae_config = read_vae_config(path)  # the weights are read (and verified) once, when the trainer loads them
    differing = architecture_differences(vae_config, config.vae)
    if differing:
        shown = ", ".join(f"{n} {getattr(vae_config, n)!r} (preset {getattr(config.vae, n)!r})" for n in differing)
        raise ConfigError("--init-from", path, f"a VAE that differs from preset {config.preset!r} in {shown}; use the "
                                               f"preset it was trained with, or another --init-from")


