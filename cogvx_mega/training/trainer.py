"""The Trainer: one optimizer step on this rank's samples, and the loop that repeats it.

A step noises this rank's samples (or clips of packs), runs megatron's forward/backward schedule over the
micro-batches, and updates the weights (megatron's optimizer: Adam, warmup + cosine LR, clipping over every
parallel group). Around it the loop hands checkpoints to the `Checkpointer`, metrics to the `MetricsLog` and
samples to a `TrainingSampler`; with `training.hang_timeout_s` a `HangWatchdog` ends a rank that stops making
progress, with `training.straggler_factor` a `StragglerReport` names the ranks that compute slower. All randomness
of a step (noise, timesteps, text and image dropout) and the data order are keyed on (seed, step, global sample
slot), never on a rank (`cogvx_mega.diffusion.randomness`): a run is reproducible, resumable from the step alone,
and gives the same losses at every layout and data-parallel size.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from cogvx_mega.checkpoint import faults
from cogvx_mega.checkpoint.meta import read_checkpoint_meta
from cogvx_mega.config.schema import Config
from cogvx_mega.diffusion.image_condition import conditioning_latents, image_drop_mask
from cogvx_mega.diffusion.loss import NoisedBatch, make_training_batch
from cogvx_mega.diffusion.randomness import Stream, slot_normal, slot_uniform
from cogvx_mega.diffusion.schedule import schedule_from_config
from cogvx_mega.diffusion.timesteps import sample_timesteps
from cogvx_mega.model.transformer import sequence_length
from cogvx_mega.parallel.data_parallel import wrap_data_parallel
from cogvx_mega.parallel.pipeline import finalize_gradients
from cogvx_mega.parallel.state import ParallelDims, data_parallel_group
from cogvx_mega.training import TrainingDiverged
from cogvx_mega.training import checkpoint as ckpt
from cogvx_mega.training.checkpointer import Checkpointer
from cogvx_mega.training.ema import WeightAverage
from cogvx_mega.training.validation import Validator
from cogvx_mega.training.interrupts import TrainingInterrupted, catch_interrupts
from cogvx_mega.training.metrics import MetricsLog, latent_grid
from cogvx_mega.training.objective import packed_v_prediction_loss, v_prediction_token_loss
from cogvx_mega.training.optimizer import build_optimizer, warmup_cosine
from cogvx_mega.training.stragglers import StragglerReport
from cogvx_mega.training.watchdog import HangWatchdog

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StopVote:
    """What the ranks agreed after a step (`Trainer._stop_vote`)."""

    signal_number: int  # 0: none
    stop_file: bool
    save_due: bool  # by time (training.save_every_minutes)


@dataclasses.dataclass
class NoisedPack:
    """One pack's clips after noising (lists, one entry per clip) and its length on this layout."""

    noisy_latents: list
    target: list
    text_embeds: list
    timesteps: torch.Tensor
    length: int
    loss_scale: float
    """Turns the pack's sum of per-clip v-MSEs into its share of the mean over the step's clips."""


def finalize_gradients_with_lora(model_chunks, num_tokens=None, **kwargs) -> None:
    """finalize_gradients, then the LoRA factors' tensor-parallel sums (`model.lora.reduce_lora_gradients`)."""
    from cogvx_mega.model.lora import reduce_lora_gradients

    finalize_gradients(model_chunks, num_tokens, **kwargs)
    reduce_lora_gradients(model_chunks)


class Trainer:
    def __init__(self, config: Config, dims: ParallelDims, model, dataset=None, run_dir: Optional[str] = None,
                 sampler=None, lora_base: Optional[dict] = None, checkpointer: Optional[Checkpointer] = None,
                 valid_dataset=None):
        """`model`: this rank's chunks (`build_model_chunks`) or one model built at the current layout; they are
        wrapped for data parallelism here (`parallel.data_parallel`), which installs megatron's hooks. `dataset`:
        anything with `step_batch(step, slots, global_batch, seed) -> {"latents", "text_embeds"}` (e.g.
        `cogvx_mega.data.latent_dataset.LatentDataset`); needed by `fit`. `sampler`: a
        `training.sampling.TrainingSampler`, run every `training.sample_every` steps. `checkpointer`: the run's
        (`run.training` hands over the one that planned its start), else one of `run_dir` and `lora_base` (what a
        LoRA run's checkpoints point at)."""
        self.config = config
        self.dims = dims
        self.model_chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.model = self.model_chunks[0]
        self.device = torch.device(config.training.device)
        t = config.training
        self.stragglers = (StragglerReport(t.straggler_factor, self.device, dims.is_logging_rank)
                           if t.straggler_factor else None)
        finalize = finalize_gradients_with_lora if config.finetune.lora else finalize_gradients
        if self.stragglers is not None:  # notes when this rank's gradients are ready, before any DP-wide wait
            finalize = self.stragglers.timer.wrap(finalize)
        self.ddp_chunks = wrap_data_parallel(self.model_chunks, config, finalize)
        self.optimizer = build_optimizer(self.ddp_chunks, config)
        self.dataset = dataset
        self.sampler = sampler
        self.checkpointer = checkpointer or Checkpointer(config, dims, run_dir, lora_base)
        self.run_dir = self.checkpointer.run_dir
        self.watchdog = HangWatchdog(t.hang_timeout_s, dims.rank, run_dir=self.run_dir)  # started by fit
        # built after the data-parallel wrap, which may move the parameters into its buffers; a LoRA run averages
        # what it trains (its adapters)
        self.ema = (WeightAverage(self.ddp_chunks, config.training.ema_decay, config.training.ema_start_step,
                                  keep=self.checkpointer.trained_keys()) if config.training.ema_decay else None)
        self.validator = Validator(self, valid_dataset) if valid_dataset is not None else None
        self.micro_batches = config.training.micro_batches_per_step(dims.data_parallel_size)
        self.global_batch = config.check_world(dims.data_parallel_size)
        # this rank's global sample slots: a contiguous block of the step's global batch
        self.slots = range(dims.data_parallel_rank * self.samples_per_rank,
                           (dims.data_parallel_rank + 1) * self.samples_per_rank)
        self.alphas_cumprod = schedule_from_config(config.diffusion)
        self.step = 0
        self.recent_losses: collections.deque = collections.deque(maxlen=config.training.loss_spike_window)
        self.skipped_in_a_row = 0
        self.stopped_by_request = False  # fit returned early because training.stop_file appeared
        self._interrupts = None  # fit's InterruptNote

    @property
    def samples_per_rank(self) -> int:
        """Samples of one optimizer step on this data-parallel rank (all accumulated micro-batches)."""
        return self.config.training.micro_batch_size * self.micro_batches

    # --- the loop --------------------------------------------------------------------------------------------
    def fit(self, on_step: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Train until `training.steps`, saving every `save_interval` steps, every `save_every_minutes` and at the
        end. A run that is already at its last step (a finished run resumed) neither trains nor saves again.
        Returns early, after a checkpoint, when training.stop_file appears; raises TrainingInterrupted (after a
        checkpoint of the finished step) on SIGINT, SIGTERM or SIGUSR1 (`training.interrupts`); raises
        TrainingDiverged (after a checkpoint of the last good weights) when training.max_skipped_steps steps in a
        row were skipped. With training.hang_timeout_s the hang watchdog runs while it trains: a beat after every
        step, paused through saves, validation and sampling (`cogvx_mega.training.watchdog`)."""
        t = self.config.training
        if self.step >= t.steps and self.dims.is_logging_rank:
            logger.info("the run is already at step %d of training.steps=%d: nothing to train (raise "
                        "training.steps to continue it)", self.step, t.steps)
        history: list[dict] = []
        log = MetricsLog(self.config, self.dims, self.run_dir, self.device, first_step=self.step)
        self.checkpointer.start_clock()
        self.watchdog.start(self.step)
        try:
            with catch_interrupts() as self._interrupts:
                while self.step < t.steps:
                    waited = time.perf_counter()
                    batch = self.dataset.step_batch(self.step, self.slots, self.global_batch, t.seed)
                    started = time.perf_counter()
                    metrics = self.train_step(batch)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    self.watchdog.beat(self.step)
                    tokens = None if "packs" in batch else self.tokens_per_sample(latent_grid(batch["latents"]))
                    metrics = {"step": self.step, **metrics,
                               **log.step_fields(self.step, batch, self.global_batch, tokens, elapsed,
                                                 started - waited)}
                    if self.stragglers is not None:
                        self.stragglers.timer.step_finished()
                        if self.step % t.log_interval == 0:  # every rank: one small all-gather
                            metrics.update(self.stragglers.report())
                    self._sample_if_due(metrics)
                    if self.validator is not None and t.valid_every and self.step % t.valid_every == 0:
                        with self.watchdog.paused():
                            metrics.update(self.validator.measure())
                    history.append(metrics)
                    log.record(metrics)
                    if on_step is not None:
                        on_step(metrics)
                    vote = self._stop_vote()
                    if self._stop_after(metrics, vote):
                        break
                    if self.checkpointer.is_due(self.step) or (vote.save_due and self.step < t.steps):
                        self.save()
                    self.finalize_saves()
                self._save_if_needed()
        finally:
            self.watchdog.stop()
            log.close()
        return history

    def _sample_if_due(self, metrics: dict) -> None:
        every = self.config.training.sample_every
        if self.sampler is not None and every and self.step % every == 0:
            with self.watchdog.paused():
                self.finish_parameter_sync()
                started = time.perf_counter()
                metrics["samples"] = self.sampler.sample(self)  # paths relative to the run folder
                metrics["sample_seconds"] = time.perf_counter() - started

    def _stop_after(self, metrics: dict, vote: "StopVote") -> bool:
        """Whether the loop ends after this step: a signal arrived (a checkpoint, then TrainingInterrupted), the
        stop file appeared (a checkpoint is saved first), or too many steps in a row were skipped (a checkpoint of
        the last good weights, then TrainingDiverged)."""
        t = self.config.training
        if metrics.get("skipped") and self.dims.is_logging_rank:
            logger.warning("step %d skipped: %s (%d in a row)", self.step, metrics["skip_reason"], self.skipped_in_a_row)
        if vote.signal_number:
            if self.dims.is_logging_rank:
                logger.warning("%s received: saving a checkpoint of step %d before stopping (Ctrl-C again aborts "
                               "without it)", signal.Signals(vote.signal_number).name, self.step)
            self._save_if_needed()
            raise TrainingInterrupted(vote.signal_number, self.step, ckpt.step_folder(self.run_dir, self.step))
        if self.skipped_in_a_row >= t.max_skipped_steps:
            self._save_if_needed()
            raise TrainingDiverged(f"{self.skipped_in_a_row} steps in a row were skipped (the last: "
                                   f"{metrics['skip_reason']}) at step {self.step}; the last good weights are saved: "
                                   f"resume with a lower training.lr, or from an earlier checkpoint "
                                   f"(training.max_skipped_steps={t.max_skipped_steps})")
        if not vote.stop_file:
            return False
        self._save_if_needed()
        self.stopped_by_request = True
        if self.dims.is_logging_rank:
            Path(t.stop_file).unlink(missing_ok=True)
            logger.info("stopped at step %d on request (%s): checkpoint saved", self.step, t.stop_file)
        return True

    def _stop_vote(self) -> "StopVote":
        """What every rank does after this step, agreed in one small all-reduce (the maximum over ranks): stop on
        a signal any rank received, stop because the logging rank sees training.stop_file, save because the
        logging rank's clock says training.save_every_minutes have passed since the last save."""
        stop_file = self.config.training.stop_file
        local = [float(self._interrupts.signal_number if self._interrupts is not None else 0),
                 1.0 if self.dims.is_logging_rank and stop_file and os.path.exists(stop_file) else 0.0,
                 1.0 if self.dims.is_logging_rank and self.checkpointer.is_due_by_time() else 0.0]
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = torch.tensor(local, device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            local = flags.tolist()
        return StopVote(signal_number=int(local[0]), stop_file=bool(local[1]), save_due=bool(local[2]))

    # --- one step --------------------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimizer step on this rank's samples (`samples_per_rank` of them, global slots `self.slots`, split
        into micro-batches in order), or on its packs ({"packs": ...}, `data/packing.py`: one pack a micro-batch).

        A dense batch may carry its own noise/timesteps/text_drop_mask (tests fix them)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if self.stragglers is not None:
            self.stragglers.timer.step_started()
        micro_batches, seq_length = (self._noised_packs(batch) if "packs" in batch
                                     else self._noised_micro_batches(batch))
        iterators = [iter(micro_batches) for _ in self.ddp_chunks]  # every virtual chunk walks the same ones
        lr = self._start_step()
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.ddp_chunks, num_microbatches=self.micro_batches, seq_length=seq_length,
            micro_batch_size=self.config.training.micro_batch_size, forward_only=False)
        return self._finish_step(losses, lr)

    def step_randomness(self, step: int, slots: range, sample_shape) -> dict[str, torch.Tensor]:
        """Noise [n, *sample_shape], timesteps [n] and text-drop mask [n] of global sample slots `slots` at
        `step`: a pure function of (seed, step, slot), the same at every layout."""
        seed, diffusion = self.config.training.seed, self.config.diffusion
        timesteps = sample_timesteps(diffusion.timestep_sampling, slots, global_batch=self.global_batch, seed=seed,
                                     step=step, num_train_timesteps=diffusion.num_train_timesteps)
        noise = slot_normal(sample_shape, slots, seed=seed, step=step, stream=Stream.NOISE)
        drop = slot_uniform(slots, seed=seed, step=step, stream=Stream.TEXT_DROP)
        out = {"noise": noise, "timesteps": timesteps, "text_drop_mask": drop < diffusion.text_dropout}
        if self.config.model.is_image_to_video:
            out["image_drop_mask"] = image_drop_mask(slots, seed=seed, step=step, dropout=diffusion.image_dropout)
        return out

    def _noise(self, latents: torch.Tensor, text_embeds: torch.Tensor, randomness: dict,
               image_latents: Optional[torch.Tensor] = None) -> NoisedBatch:
        """Samples [n, T, C, H, W] noised at their timesteps (x_t, the v target, text dropped where the mask says),
        on the training device; an image-to-video model's input gets [noisy video ‖ the image latent in frame 0,
        zeros after] (v and the loss stay on the video channels)."""
        to_device = self._to_device
        noised = make_training_batch(to_device(latents), to_device(text_embeds), to_device(randomness["noise"]),
                                     to_device(randomness["timesteps"]), self.alphas_cumprod,
                                     to_device(randomness["text_drop_mask"]))
        if self.config.model.is_image_to_video:
            if image_latents is None:
                raise ValueError("an image-to-video model trains on batches with image_latents [n, 1, C, h, w] (the "
                                 "first frame's latent); this dataset gives none")
            condition = conditioning_latents(to_device(image_latents).to(noised.noisy_latents.dtype),
                                             latents.shape[1], randomness["image_drop_mask"])
            noised.noisy_latents = torch.cat([noised.noisy_latents, condition], dim=2)
        return noised

    def _noised_micro_batches(self, batch: dict) -> tuple[list[NoisedBatch], int]:
        """This rank's samples noised (keyed on their global slots) and cut into micro-batches, and the sequence
        length the model runs them at."""
        latents, micro = batch["latents"], self.config.training.micro_batch_size
        if latents.shape[0] != self.samples_per_rank:
            raise ValueError(f"train_step got {latents.shape[0]} samples; this rank takes {self.samples_per_rank} "
                             f"({self.micro_batches} micro-batches of {micro})")
        randomness = self.step_randomness(self.step, self.slots, latents.shape[1:])
        randomness.update({k: batch[k] for k in ("noise", "timesteps", "text_drop_mask", "image_drop_mask")
                           if k in batch})
        noised = self._noise(latents, batch["text_embeds"], randomness, batch.get("image_latents"))
        micro_batches = [NoisedBatch(**{f.name: getattr(noised, f.name)[i * micro:(i + 1) * micro]
                                        for f in dataclasses.fields(NoisedBatch)}) for i in range(self.micro_batches)]
        return micro_batches, self.padded_tokens_per_sample(latent_grid(latents))

    def _noised_packs(self, batch: dict) -> tuple[list[NoisedPack], int]:
        """This rank's packs, noised: every clip's noise, timestep and text dropout keyed on its global slot (its
        place among the step's clips), timesteps stratified over the step's clips; and the pack length."""
        from cogvx_mega.model.packing import padded_pack_length

        if len(batch["packs"]) != self.samples_per_rank:
            raise ValueError(f"train_step got {len(batch['packs'])} packs; this rank takes {self.samples_per_rank}")
        seed, diffusion, m = self.config.training.seed, self.config.diffusion, self.config.model
        clips_in_step = batch["clips_in_step"]
        # every pack of the step padded to the longest one (pipeline parallel sends fixed shapes)
        length = max(padded_pack_length(m, shapes, self.model.config) for shapes in batch["clip_shapes_of_step"])
        scale = self.dims.data_parallel_size * self.micro_batches / clips_in_step
        packs = []
        for pack in batch["packs"]:
            slots = pack["slots"]
            timesteps = sample_timesteps(diffusion.timestep_sampling, slots, global_batch=clips_in_step, seed=seed,
                                         step=self.step, num_train_timesteps=diffusion.num_train_timesteps)
            drop = slot_uniform(slots, seed=seed, step=self.step, stream=Stream.TEXT_DROP) < diffusion.text_dropout
            clips = [self._noise(latents[None], text[None], {
                "noise": slot_normal(latents.shape, [slot], seed=seed, step=self.step, stream=Stream.NOISE),
                "timesteps": timesteps[index:index + 1], "text_drop_mask": drop[index:index + 1]})
                for index, (latents, text, slot) in enumerate(zip(pack["latents"], pack["text_embeds"], slots))]
            packs.append(NoisedPack([c.noisy_latents[0] for c in clips], [c.target[0] for c in clips],
                                    [c.text_embeds[0] for c in clips], self._to_device(timesteps), length, scale))
        return packs, length

    def _forward_step(self, data_iterator, model):
        """megatron schedule callback: one micro-batch (samples or a pack) forward, and its loss function."""
        micro = next(data_iterator)
        packed = isinstance(micro, NoisedPack)
        m = self.config.model
        ofs = self.config.diffusion.ofs if m.ofs_embed_dim else None  # the 1.5-I2V model's input
        with self.autocast():
            prediction = model(micro.noisy_latents, micro.text_embeds, micro.timesteps, ofs=ofs, return_tokens=True,
                               pack_length=micro.length if packed else None)
        if packed:
            layout = self.model.pack_layout(micro.noisy_latents, micro.text_embeds, micro.length)

            def loss_of(output):
                return micro.loss_scale * packed_v_prediction_loss(output, micro.target, layout, m.patch_size,
                                                                   m.patch_size_t, self.model.cp_group)
        else:
            padded = self.padded_tokens_per_sample(latent_grid(micro.noisy_latents))

            def loss_of(output):
                return v_prediction_token_loss(output, micro.target, micro.text_embeds.shape[1], m.patch_size,
                                               m.patch_size_t, padded, self.model.cp_group)

        def loss_func(output: torch.Tensor):
            loss = loss_of(output)
            return loss, {"loss": loss.detach().clone()}  # megatron divides `loss` in place afterwards

        return prediction, loss_func

    def _start_step(self) -> float:
        t = self.config.training
        lr = warmup_cosine(self.step, warmup_steps=t.warmup_steps, total_steps=t.steps, lr=t.lr, min_lr=t.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for chunk in self.ddp_chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        faults.maybe_slow(self.step)  # COGVX_FAULT_INJECT=slow@S: this rank lags (the straggler test)
        return lr

    def _finish_step(self, losses, lr: float) -> dict[str, float]:
        loss = self._average_over_data_parallel(self._pipeline_loss(losses)).item()  # the same on every rank
        reason = self._skip_reason(loss)
        if reason is not None:  # no update: the gradients are dropped (the next step zeroes them)
            self.step += 1
            self.skipped_in_a_row += 1
            return {"loss": loss, "grad_norm": None, "lr": lr, "skipped": True, "skip_reason": reason}
        faults.maybe_kill("step", self.step)
        _, grad_norm, _ = self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            self.finish_parameter_sync()  # overlap_param_gather defers the updated weights' all-gather
            self.ema.update(self.step)
        self.skipped_in_a_row = 0
        self.recent_losses.append(loss)
        return {"loss": loss, "grad_norm": float(grad_norm), "lr": lr}

    def _skip_reason(self, loss: float) -> Optional[str]:
        """Why this step's update is skipped (None: it is not): a non-finite loss, or with
        training.loss_spike_factor a loss that many times the mean of the recent accepted ones."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        factor = self.config.training.loss_spike_factor
        if factor is not None and len(self.recent_losses) >= min(5, self.recent_losses.maxlen):
            mean = sum(self.recent_losses) / len(self.recent_losses)
            if loss > factor * mean:
                return f"loss spike {loss:.4g} > {factor:g} x {mean:.4g} (mean of the last {len(self.recent_losses)})"
        return None

    def _pipeline_loss(self, losses: list[dict]) -> torch.Tensor:
        """Mean micro-batch loss, computed on the last pipeline stage and sent to every stage."""
        from megatron.core import parallel_state

        loss = torch.zeros(1, dtype=torch.float32, device=self.device)
        if losses:  # only the last stage gets loss dicts back
            loss = torch.stack([m["loss"].float() for m in losses]).mean().reshape(1)
            if parallel_state.get_context_parallel_world_size() > 1:  # each CP rank holds its share of the mean
                dist.all_reduce(loss, group=parallel_state.get_context_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            dist.broadcast(loss, src=dist.get_global_rank(group, group.size() - 1), group=group)
        return loss

    def _average_over_data_parallel(self, value: torch.Tensor) -> torch.Tensor:
        if self.dims.data_parallel_size > 1:
            dist.all_reduce(value, group=data_parallel_group())
            value /= self.dims.data_parallel_size
        return value

    def autocast(self):
        """bf16 autocast for training.mixed_precision=autocast; bf16 parameters need none (Float16Module)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.config.training.precision() == "autocast")

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host tensors go to the GPU through pinned memory, asynchronously (a no-op on CPU)."""
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def finish_parameter_sync(self) -> None:
        """Complete the deferred parameter all-gather of overlap_param_gather (before saving or evaluating)."""
        if self.config.parallel.overlap_param_gather:
            for ddp in self.ddp_chunks:
                ddp.start_param_sync(force_sync=True)

    def padded_tokens_per_sample(self, grid: Optional[tuple[int, int, int]] = None) -> int:
        """The sequence the model runs on: padded to split evenly over CP (and TP under sequence parallel)."""
        from cogvx_mega.parallel.context import padded_sequence_length

        return padded_sequence_length(self.tokens_per_sample(grid), self.model.config)

    def tokens_per_sample(self, grid: Optional[tuple[int, int, int]] = None) -> int:
        """Tokens of one sample at the latent `grid` (frames, height, width; default: the config's resolution)."""
        m = self.config.model
        return sequence_length(m, *(grid or self.config.data.latent_shape(m)), m.max_text_seq_length)

    # --- checkpoints (the Checkpointer's, at this trainer's step) ----------------------------------------------
    def save(self) -> Path:
        """A checkpoint of model, optimizer and step at run_dir/checkpoints/step_<N>/ (all ranks take part)."""
        with self.watchdog.paused():
            self.finish_parameter_sync()
            state_of = getattr(self.dataset, "state_dict", None)
            return self.checkpointer.save(self.step, self.ddp_chunks, self.optimizer, self.global_batch,
                                          state_of() if state_of is not None else None, ema=self.ema)

    def _save_if_needed(self) -> None:
        """A checkpoint of this step unless there is one (then every save is completed)."""
        if self.checkpointer.last_saved_step != self.step:
            self.save()
        self.finalize_saves(blocking=True)

    def finalize_saves(self, blocking: bool = False) -> None:
        with self.watchdog.paused():  # a blocking one waits for the background writes
            self.checkpointer.finalize(blocking)

    def load(self, path) -> None:
        """Resume model, optimizer and step from a training checkpoint saved at any layout (and the data order's
        saved state, where the dataset keeps one)."""
        with self.watchdog.paused():  # before fit, unless a caller loads while training
            self.step = self.checkpointer.load(path, self.ddp_chunks, self.optimizer, ema=self.ema)
        load_state = getattr(self.dataset, "load_state_dict", None)
        if load_state is not None:
            state = read_checkpoint_meta(path).get("data_state")
            if state:
                load_state(state)
