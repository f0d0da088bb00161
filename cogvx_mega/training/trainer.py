"""The training loop: AdamW, warmup + cosine LR, gradient clipping, data parallel over gloo/NCCL.

All randomness of a step (noise, timesteps, text dropout) is keyed on (seed, step, data-parallel
rank), so a run is reproducible, resumable from the step alone, and a data-parallel run equals a
single process holding the whole global batch.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..config.schema import Config
from ..diffusion.loss import make_training_batch, v_prediction_loss
from ..diffusion.schedule import schedule_from_config
from ..diffusion.timesteps import sample_timesteps, step_generator
from ..parallel.state import ParallelDims, data_parallel_group
from . import checkpoint as ckpt

logger = logging.getLogger(__name__)

_NOISE_STREAM = 0x4E01
_TEXT_DROP_STREAM = 0x7D02


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, lr: float, min_lr: float) -> float:
    """LR at `step` (0-based): linear warmup to lr, then cosine decay to min_lr at total_steps."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and position tables."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or "norm" in name or "pos_embedding" in name else decay).append(param)
    t = config.training
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)


class Trainer:
    def __init__(self, config: Config, dims: ParallelDims, model: torch.nn.Module, dataset=None,
                 run_dir: Optional[str] = None):
        self.config = config
        self.dims = dims
        self.model = model
        self.dataset = dataset
        self.run_dir = Path(run_dir or config.training.run_dir)
        self.device = torch.device(config.training.device)
        self.optimizer = build_optimizer(model, config)
        self.alphas_cumprod = schedule_from_config(config.diffusion)
        self.step = 0
        self._broadcast_parameters()

    # --- distributed helpers -----------------------------------------------------------------------
    def _broadcast_parameters(self) -> None:
        """Every data-parallel replica starts from rank 0's weights."""
        if self.dims.data_parallel_size == 1:
            return
        group = data_parallel_group()
        source = dist.get_global_rank(group, 0)
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            dist.broadcast(tensor.data, src=source, group=group)

    def _average_over_data_parallel(self, tensors: list[torch.Tensor]) -> None:
        if self.dims.data_parallel_size == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=data_parallel_group())
        flat /= self.dims.data_parallel_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    # --- one step ----------------------------------------------------------------------------------
    def step_randomness(self, batch_size: int, latent_shape: torch.Size, step: int) -> dict[str, torch.Tensor]:
        """Noise, timesteps and text-drop mask of this rank at `step` (a pure function of seed/step/rank)."""
        seed, rank = self.config.training.seed, self.dims.data_parallel_rank
        diffusion = self.config.diffusion
        timesteps = sample_timesteps(diffusion.timestep_sampling, batch_size, seed=seed, step=step,
                                     data_parallel_rank=rank, data_parallel_size=self.dims.data_parallel_size,
                                     num_train_timesteps=diffusion.num_train_timesteps)
        noise = torch.randn(latent_shape, generator=step_generator(seed, step, rank, _NOISE_STREAM))
        drop = torch.rand(batch_size, generator=step_generator(seed, step, rank, _TEXT_DROP_STREAM))
        return {"noise": noise, "timesteps": timesteps, "text_drop_mask": drop < diffusion.text_dropout}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on this rank's micro-batch. `batch` may carry its own noise/timesteps/text_drop_mask."""
        t = self.config.training
        latents = batch["latents"]
        randomness = self.step_randomness(latents.shape[0], latents.shape, self.step)
        randomness.update({k: batch[k] for k in ("noise", "timesteps", "text_drop_mask") if k in batch})
        to_device = lambda x: x.to(self.device, non_blocking=True)  # noqa: E731
        noised = make_training_batch(to_device(latents), to_device(batch["text_embeds"]), to_device(randomness["noise"]),
                                     to_device(randomness["timesteps"]), self.alphas_cumprod,
                                     to_device(randomness["text_drop_mask"]))
        lr = warmup_cosine(self.step, warmup_steps=t.warmup_steps, total_steps=t.steps, lr=t.lr, min_lr=t.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and t.bf16)
        with autocast:
            prediction = self.model(noised.noisy_latents, noised.text_embeds, noised.timesteps)
        loss = v_prediction_loss(prediction, noised.target)
        loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self._average_over_data_parallel(grads)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        reported = loss.detach().float().reshape(1)
        self._average_over_data_parallel([reported])
        self.step += 1
        return {"loss": reported.item(), "grad_norm": float(grad_norm), "lr": lr}

    def tokens_per_sample(self) -> int:
        m, d = self.config.model, self.config.data
        frames, height, width = d.latent_shape(m)
        return m.max_text_seq_length + (frames // (m.patch_size_t or 1)) * (height // m.patch_size) * (width // m.patch_size)

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self, on_step: Optional[Callable[[dict], None]] = None) -> list[dict]:
        from cogvx_mega.data.latent_dataset import rank_batch

        t = self.config.training
        history: list[dict] = []
        is_logger = self.dims.is_logging_rank
        metrics_file = self.run_dir / "metrics.jsonl"
        progress = None
        if is_logger:
            from tqdm.auto import tqdm

            self.run_dir.mkdir(parents=True, exist_ok=True)
            progress = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        global_batch = t.micro_batch_size * self.dims.data_parallel_size
        while self.step < t.steps:
            batch = rank_batch(self.dataset, self.step, t.micro_batch_size, self.dims.data_parallel_rank,
                               self.dims.data_parallel_size, t.seed)
            started = time.perf_counter()
            metrics = self.train_step(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = max(time.perf_counter() - started, 1e-9)
            metrics = {"step": self.step, **metrics, "samples_per_s": global_batch / elapsed,
                       "tokens_per_s": global_batch * self.tokens_per_sample() / elapsed}
            history.append(metrics)
            if is_logger:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
                progress.update(1)
                if self.step % t.log_interval == 0:
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            if on_step is not None:
                on_step(metrics)
            if t.save_interval and self.step % t.save_interval == 0 and self.step < t.steps:
                self.save()
        if progress is not None:
            progress.close()
        self.save()
        return history

    # --- checkpoints -------------------------------------------------------------------------------
    def save(self) -> Optional[Path]:
        """Rank 0 writes step_<N>/ atomically (DP replicas are identical); old ones beyond the retention go."""
        path = None
        if self.dims.is_logging_rank:
            path = ckpt.step_folder(self.run_dir, self.step)
            ckpt.save_project_checkpoint(path, self.config.model, self.model.state_dict(), step=self.step,
                                         trainer_state={"optimizer": self.optimizer.state_dict(), "step": self.step},
                                         extra={"preset": self.config.preset})
            ckpt.prune_checkpoints(self.run_dir, self.config.training.keep_checkpoints)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return path

    def load(self, path: str) -> None:
        from ..api import load_state_into

        model_config, state, meta = ckpt.read_project_checkpoint(path)
        load_state_into(self.model, state, self.config.model)
        trainer_state = ckpt.read_trainer_state(path)
        if trainer_state is not None:
            self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.step = int(meta.get("step", 0))
