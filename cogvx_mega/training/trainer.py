"""The training loop: AdamW, warmup + cosine LR, gradient clipping, data parallel over gloo/NCCL.

All randomness of a step (noise, timesteps, text dropout) and the data order are keyed on (seed, step,
global sample slot), never on a rank (`cogvx_mega.diffusion.randomness`): a run is reproducible,
resumable from the step alone, and gives the same losses at every layout and data-parallel size.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from cogvx_mega.checkpoint import faults
from cogvx_mega.checkpoint.meta import SHARDED_FORMAT, read_checkpoint_meta
from cogvx_mega.checkpoint.sharded import load_sharded_checkpoint, save_sharded_checkpoint
from cogvx_mega.config.schema import Config, ConfigError
from cogvx_mega.diffusion.image_condition import conditioning_latents, image_drop_mask
from cogvx_mega.diffusion.loss import NoisedBatch, make_training_batch
from cogvx_mega.diffusion.randomness import Stream, slot_normal, slot_uniform
from cogvx_mega.diffusion.schedule import schedule_from_config
from cogvx_mega.diffusion.timesteps import sample_timesteps
from cogvx_mega.parallel import cpu_compat
from cogvx_mega.parallel.state import ParallelDims, data_parallel_group
from cogvx_mega.training import TrainingDiverged
from cogvx_mega.training import checkpoint as ckpt
from cogvx_mega.training.objective import packed_v_prediction_loss, v_prediction_token_loss
from cogvx_mega.training.optimizer import build_optimizer, use_fused_cpu_adam, warmup_cosine

logger = logging.getLogger(__name__)


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


def wrap_data_parallel(model_chunks: list[torch.nn.Module], config: Config) -> list[torch.nn.Module]:
    """megatron DDP per model chunk: gradients averaged over the data-parallel group into fp32 buffers. With
    bf16 parameters (`training.mixed_precision`) each chunk is first cast to bf16 in megatron's Float16Module,
    which also converts the first stage's inputs and returns the last stage's outputs in fp32."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from cogvx_mega.parallel.pipeline import (finalize_gradients, mark_replicated_copies,
                                              synchronize_replicated_parameters)

    p = config.parallel
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
                                               overlap_param_gather=p.overlap_param_gather,
                                               use_distributed_optimizer=p.use_distributed_optimizer,
                                               bucket_size=p.ddp_bucket_size)
    wrapped = []
    bf16_params = config.training.precision() == "bf16_params"
    finalize = finalize_gradients
    if config.finetune.lora:
        finalize = _finalize_gradients_with_lora
    for index, chunk in enumerate(model_chunks):
        chunk.config.finalize_model_grads_func = finalize  # the schedules call it after backward
        module = chunk
        if bf16_params:
            chunk.config.bf16 = True
            chunk.config.pipeline_dtype = torch.bfloat16  # what pipeline stages send each other
            module = Float16Module(chunk.config, chunk)
        ddp = DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=module,
                                      disable_bucketing=index > 0)
        ddp.broadcast_params()  # every data-parallel replica starts from the first replica's weights
        wrapped.append(ddp)
    # megatron's hooks for overlapped communication (as its own training loop registers them)
    first = model_chunks[0].config
    pick = (lambda fns: fns[0] if len(fns) == 1 else fns)  # noqa: E731
    if p.overlap_grad_reduce:
        first.no_sync_func = pick([ddp.no_sync for ddp in wrapped])  # reduce once, after the last micro-batch
        first.grad_sync_func = pick([ddp.start_grad_sync for ddp in wrapped])
    if p.overlap_param_gather:
        first.param_sync_func = pick([ddp.start_param_sync for ddp in wrapped])
    synchronize_replicated_parameters(model_chunks)
    mark_replicated_copies(model_chunks)
    if cpu_compat.is_enabled():
        cpu_compat.fuse_weight_gradient_accumulation(model_chunks)
    return wrapped


def _finalize_gradients_with_lora(model_chunks, num_tokens=None, **kwargs) -> None:
    """finalize_gradients, then the LoRA factors' tensor-parallel sums (`model.lora.reduce_lora_gradients`)."""
    from cogvx_mega.model.lora import reduce_lora_gradients
    from cogvx_mega.parallel.pipeline import finalize_gradients

    finalize_gradients(model_chunks, num_tokens, **kwargs)
    reduce_lora_gradients(model_chunks)


class Trainer:
    def __init__(self, config: Config, dims: ParallelDims, model, dataset=None, run_dir: Optional[str] = None,
                 sampler=None):
        """`model`: this rank's chunks (`build_model_chunks`) or one model built at the current layout.
        `dataset`: anything with `step_batch(step, slots, global_batch, seed) -> {"latents", "text_embeds"}`
        (e.g. `cogvx_mega.data.latent_dataset.LatentDataset`); needed by `fit`. `sampler`: a
        `training.sampling.TrainingSampler`, run every `training.sample_every` steps."""
        self.config = config
        self.dims = dims
        self.model_chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.model = self.model_chunks[0]
        self.ddp_chunks = wrap_data_parallel(self.model_chunks, config)
        self.dataset = dataset
        self.sampler = sampler
        self.run_dir = Path(run_dir or config.training.run_dir)
        self.device = torch.device(config.training.device)
        self.micro_batches = config.training.micro_batches_per_step(dims.data_parallel_size)
        self.global_batch = config.check_world(dims.data_parallel_size)
        # this rank's global sample slots: a contiguous block of the step's global batch
        self.slots = range(dims.data_parallel_rank * self.samples_per_rank,
                           (dims.data_parallel_rank + 1) * self.samples_per_rank)
        self.optimizer = build_optimizer(self.ddp_chunks, config)
        self.alphas_cumprod = schedule_from_config(config.diffusion)
        self.step = 0
        self._last_saved_step: Optional[int] = None  # the step of the newest checkpoint of this run (None: none)
        self._async_saves = None  # megatron AsyncCallsQueue, created by the first async save
        self.recent_losses: collections.deque = collections.deque(maxlen=config.training.loss_spike_window)
        self.skipped_in_a_row = 0
        self.stopped_by_request = False  # fit returned early because training.stop_file appeared
        self.lora_base: Optional[dict] = None
        """LoRA runs: {"base": path, "base_fingerprint": ..., "base_lora": path or None}, what the adapters'
        checkpoints point at (set by whoever loaded the base weights)."""

    def _average_over_data_parallel(self, value: torch.Tensor) -> torch.Tensor:
        if self.dims.data_parallel_size > 1:
            dist.all_reduce(value, group=data_parallel_group())
            value /= self.dims.data_parallel_size
        return value

    # --- one step ----------------------------------------------------------------------------------
    def step_randomness(self, step: int, slots: range, sample_shape) -> dict[str, torch.Tensor]:
        """Noise [n, *sample_shape], timesteps [n] and text-drop mask [n] of global sample slots `slots` at
        `step`: a pure function of (seed, step, slot), the same at every layout."""
        seed, diffusion = self.config.training.seed, self.config.diffusion
        timesteps = sample_timesteps(diffusion.timestep_sampling, slots, global_batch=self.global_batch, seed=seed,
                                     step=step, num_train_timesteps=diffusion.num_train_timesteps)
        noise = slot_normal(sample_shape, slots, seed=seed, step=step, stream=Stream.NOISE)
        drop = slot_uniform(slots, seed=seed, step=step, stream=Stream.TEXT_DROP)
        out = {"noise": noise, "timesteps": timesteps, "text_drop_mask": drop < diffusion.text_dropout}
        if self.image_to_video:
            out["image_drop_mask"] = image_drop_mask(slots, seed=seed, step=step, dropout=diffusion.image_dropout)
        return out

    @property
    def image_to_video(self) -> bool:
        m = self.config.model
        return m.in_channels != m.out_channels

    def _ofs(self):
        """The 1.5-I2V model's ofs input (None for the models without it)."""
        return self.config.diffusion.ofs if self.config.model.ofs_embed_dim else None

    def _forward_step(self, data_iterator, model):
        """megatron schedule callback: one micro-batch forward, and the loss function for its output."""
        noised = next(data_iterator)
        if isinstance(noised, NoisedPack):
            return self._forward_pack(noised, model)
        with self._autocast():
            prediction = model(noised.noisy_latents, noised.text_embeds, noised.timesteps, ofs=self._ofs(),
                               return_tokens=True)
        m = self.config.model
        padded = self.padded_tokens_per_sample(self._latent_grid(noised.noisy_latents))

        def loss_func(output: torch.Tensor):
            loss = v_prediction_token_loss(output, noised.target, noised.text_embeds.shape[1], m.patch_size,
                                           m.patch_size_t, padded, self.model.cp_group)
            return loss, {"loss": loss.detach().clone()}  # megatron divides `loss` in place afterwards

        return prediction, loss_func

    def _forward_pack(self, pack: NoisedPack, model):
        with self._autocast():
            prediction = model(pack.noisy_latents, pack.text_embeds, pack.timesteps, return_tokens=True,
                               pack_length=pack.length)
        m = self.config.model
        layout = self.model.pack_layout(pack.noisy_latents, pack.text_embeds, pack.length)

        def loss_func(output: torch.Tensor):
            loss = pack.loss_scale * packed_v_prediction_loss(output, pack.target, layout, m.patch_size,
                                                              m.patch_size_t, self.model.cp_group)
            return loss, {"loss": loss.detach().clone()}

        return prediction, loss_func

    def _noised_packs(self, batch: dict) -> list[NoisedPack]:
        """This rank's packs, noised: every clip's noise, timestep and text dropout keyed on its global slot
        (its place among the step's clips), timesteps stratified over the step's clips."""
        from cogvx_mega.model.packing import padded_pack_length

        seed, diffusion, m = self.config.training.seed, self.config.diffusion, self.config.model
        clips_in_step = batch["clips_in_step"]
        # every pack of the step padded to the longest one (pipeline parallel sends fixed shapes)
        length = max(padded_pack_length(m, shapes, self.model.config) for shapes in batch["clip_shapes_of_step"])
        scale = self.dims.data_parallel_size * self.micro_batches / clips_in_step
        to_device = self._to_device
        packs = []
        for pack in batch["packs"]:
            slots = pack["slots"]
            timesteps = sample_timesteps(diffusion.timestep_sampling, slots, global_batch=clips_in_step, seed=seed,
                                         step=self.step, num_train_timesteps=diffusion.num_train_timesteps)
            drop = slot_uniform(slots, seed=seed, step=self.step, stream=Stream.TEXT_DROP) < diffusion.text_dropout
            noisy, target, texts = [], [], []
            for latents, text, slot, index in zip(pack["latents"], pack["text_embeds"], slots, range(len(slots))):
                noise = slot_normal(latents.shape, [slot], seed=seed, step=self.step, stream=Stream.NOISE)
                clip = make_training_batch(to_device(latents[None]), to_device(text[None]), to_device(noise),
                                           to_device(timesteps[index:index + 1]), self.alphas_cumprod,
                                           to_device(drop[index:index + 1]))
                noisy.append(clip.noisy_latents[0])
                target.append(clip.target[0])
                texts.append(clip.text_embeds[0])
            packs.append(NoisedPack(noisy, target, texts, to_device(timesteps), length, scale))
        return packs

    def _train_packed_step(self, batch: dict) -> dict[str, float]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t = self.config.training
        if len(batch["packs"]) != self.samples_per_rank:
            raise ValueError(f"train_step got {len(batch['packs'])} packs; this rank takes {self.samples_per_rank}")
        packs = self._noised_packs(batch)
        iterators = [iter(packs) for _ in self.ddp_chunks]
        lr = self._start_step()
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.ddp_chunks, num_microbatches=self.micro_batches, seq_length=packs[0].length,
            micro_batch_size=t.micro_batch_size, forward_only=False)
        return self._finish_step(losses, lr)

    def _start_step(self) -> float:
        t = self.config.training
        lr = warmup_cosine(self.step, warmup_steps=t.warmup_steps, total_steps=t.steps, lr=t.lr, min_lr=t.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for chunk in self.ddp_chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
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

    def _autocast(self):
        """bf16 autocast for training.mixed_precision=autocast; bf16 parameters need none (Float16Module)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.config.training.precision() == "autocast")

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host tensors go to the GPU through pinned memory, asynchronously (a no-op on CPU)."""
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    @property
    def samples_per_rank(self) -> int:
        """Samples of one optimizer step on this data-parallel rank (all accumulated micro-batches)."""
        return self.config.training.micro_batch_size * self.micro_batches

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

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on this rank's samples (`samples_per_rank` of them, global slots `self.slots`,
        split into micro-batches in order).

        `batch` may carry its own noise/timesteps/text_drop_mask (tests fix them). A batch of packs
        ({"packs": ...}, `data/packing.py`) trains one pack per micro-batch.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if "packs" in batch:
            return self._train_packed_step(batch)
        t = self.config.training
        latents = batch["latents"]
        if latents.shape[0] != self.samples_per_rank:
            raise ValueError(f"train_step got {latents.shape[0]} samples; this rank takes {self.samples_per_rank} "
                             f"({self.micro_batches} micro-batches of {t.micro_batch_size})")
        randomness = self.step_randomness(self.step, self.slots, latents.shape[1:])
        randomness.update({k: batch[k] for k in ("noise", "timesteps", "text_drop_mask", "image_drop_mask")
                           if k in batch})
        to_device = self._to_device
        noised = make_training_batch(to_device(latents), to_device(batch["text_embeds"]), to_device(randomness["noise"]),
                                     to_device(randomness["timesteps"]), self.alphas_cumprod,
                                     to_device(randomness["text_drop_mask"]))
        if self.image_to_video:  # [noisy video ‖ image latent in frame 0, zeros after]; v and the loss stay on video
            if "image_latents" not in batch:
                raise ValueError("an image-to-video model trains on batches with image_latents [n, 1, C, h, w] (the "
                                 "first frame's latent); this dataset gives none")
            condition = conditioning_latents(to_device(batch["image_latents"]).to(noised.noisy_latents.dtype),
                                             latents.shape[1], randomness["image_drop_mask"])
            noised.noisy_latents = torch.cat([noised.noisy_latents, condition], dim=2)
        micro = t.micro_batch_size
        micro_batches = [NoisedBatch(**{f.name: getattr(noised, f.name)[i * micro:(i + 1) * micro]
                                        for f in dataclasses.fields(NoisedBatch)})
                         for i in range(self.micro_batches)]
        # every virtual chunk walks the same micro-batches
        iterators = [iter(micro_batches) for _ in self.ddp_chunks]
        lr = self._start_step()
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.ddp_chunks, num_microbatches=self.micro_batches,
            seq_length=self.padded_tokens_per_sample(self._latent_grid(latents)),
            micro_batch_size=micro, forward_only=False)
        return self._finish_step(losses, lr)

    def finish_parameter_sync(self) -> None:
        """Complete the deferred parameter all-gather of overlap_param_gather (before saving or evaluating)."""
        if self.config.parallel.overlap_param_gather:
            for ddp in self.ddp_chunks:
                ddp.start_param_sync(force_sync=True)

    @staticmethod
    def _latent_grid(latents: torch.Tensor) -> tuple[int, int, int]:
        """(frames, height, width) of a [B, T, C, H, W] latent batch (buckets make it differ from step to step)."""
        return latents.shape[1], latents.shape[3], latents.shape[4]

    def padded_tokens_per_sample(self, latent_grid: Optional[tuple[int, int, int]] = None) -> int:
        """The sequence the model runs on: padded to split evenly over CP (and TP under sequence parallel)."""
        from cogvx_mega.parallel.context import padded_sequence_length

        return padded_sequence_length(self.tokens_per_sample(latent_grid), self.model.config)

    def tokens_per_sample(self, latent_grid: Optional[tuple[int, int, int]] = None) -> int:
        """Tokens of one sample at `latent_grid` (default: the config's resolution)."""
        from cogvx_mega.model.transformer import sequence_length

        m = self.config.model
        return sequence_length(m, *(latent_grid or self.config.data.latent_shape(m)), m.max_text_seq_length)

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self, on_step: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Train until `training.steps`, saving every `save_interval` steps and at the end. A run that is
        already at its last step (a finished run resumed) neither trains nor saves again. Returns early, after a
        checkpoint, when training.stop_file appears; raises TrainingDiverged (after a checkpoint of the last
        good weights) when training.max_skipped_steps steps in a row were skipped."""
        from cogvx_mega.training.telemetry import Telemetry

        t = self.config.training
        history: list[dict] = []
        is_logger = self.dims.is_logging_rank
        metrics_file = self.run_dir / "metrics.jsonl"
        progress = None
        if is_logger:
            from tqdm.auto import tqdm

            self.run_dir.mkdir(parents=True, exist_ok=True)
            progress = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        telemetry = Telemetry(self.config, self.device, self.run_dir, is_logger, self.dims.world_size)
        global_batch = self.global_batch
        if self.step >= t.steps and is_logger:
            logger.info("the run is already at step %d of training.steps=%d: nothing to train (raise "
                        "training.steps to continue it)", self.step, t.steps)
        try:
            while self.step < t.steps:
                waited = time.perf_counter()
                batch = self.dataset.step_batch(self.step, self.slots, global_batch, t.seed)
                started = time.perf_counter()
                metrics = self.train_step(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = max(time.perf_counter() - started, 1e-9)
                metrics = {"step": self.step, **metrics, **self._throughput(batch, elapsed)}
                if self.step % t.log_interval == 0:
                    metrics.update(telemetry.step_fields(self._step_flops(batch), elapsed, started - waited))
                if metrics.get("skipped") and is_logger:
                    logger.warning("step %d skipped: %s (%d in a row)", self.step, metrics["skip_reason"],
                                   self.skipped_in_a_row)
                if self.sampler is not None and t.sample_every and self.step % t.sample_every == 0:
                    self.finish_parameter_sync()
                    started = time.perf_counter()
                    metrics["samples"] = self.sampler.sample(self)  # paths relative to the run folder
                    metrics["sample_seconds"] = time.perf_counter() - started
                history.append(metrics)
                if is_logger:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    telemetry.write(metrics)
                    progress.update(1)
                    if self.step % t.log_interval == 0:
                        progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                if on_step is not None:
                    on_step(metrics)
                if self.skipped_in_a_row >= t.max_skipped_steps:
                    self._save_if_needed()
                    raise TrainingDiverged(f"{self.skipped_in_a_row} steps in a row were skipped (the last: "
                                           f"{metrics['skip_reason']}) at step {self.step}; the last good weights "
                                           f"are saved: resume with a lower training.lr, or from an earlier "
                                           f"checkpoint (training.max_skipped_steps={t.max_skipped_steps})")
                if self._stop_requested():
                    self._save_if_needed()
                    self.stopped_by_request = True
                    if is_logger:
                        Path(t.stop_file).unlink(missing_ok=True)
                        logger.info("stopped at step %d on request (%s): checkpoint saved", self.step, t.stop_file)
                    break
                if t.save_interval and self.step % t.save_interval == 0 and self.step < t.steps:
                    self.save()
                self.finalize_saves()
        finally:
            if progress is not None:
                progress.close()
            telemetry.close()
        self._save_if_needed()
        return history

    def _save_if_needed(self) -> None:
        """A checkpoint of this step unless there is one (then every save is completed)."""
        if self._last_saved_step != self.step:
            self.save()
        self.finalize_saves(blocking=True)

    def _stop_requested(self) -> bool:
        """training.stop_file exists (the logging rank looks; every rank gets its answer)."""
        stop_file = self.config.training.stop_file
        if not stop_file:
            return False
        flag = torch.tensor([1.0 if self.dims.is_logging_rank and os.path.exists(stop_file) else 0.0],
                            device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _throughput(self, batch: dict, elapsed: float) -> dict:
        global_batch = self.global_batch
        if "packs" in batch:  # global_batch counts packs; tokens are the packs' real tokens
            fields = {"clips": batch["clips_in_step"], "samples_per_s": batch["clips_in_step"] / elapsed,
                      "tokens_per_s": batch["real_tokens"] / elapsed,
                      "packing_efficiency": batch["real_tokens"] / (global_batch * batch["pack_tokens"])}
        else:
            fields = {"samples_per_s": global_batch / elapsed,
                      "tokens_per_s": global_batch * self.tokens_per_sample(self._latent_grid(batch["latents"]))
                      / elapsed}
        if "stage" in batch:
            fields["stage"] = batch["stage"]
        return fields

    def _step_flops(self, batch: dict) -> float:
        """Model FLOPs of the step over all ranks (`cogvx_mega.model.flops`)."""
        from cogvx_mega.model.flops import training_flops
        from cogvx_mega.model.transformer import sequence_length

        m = self.config.model
        if "packs" in batch:
            tokens = [sequence_length(m, c.latent_frames, c.latent_height, c.latent_width, c.text_length)
                      for shapes in batch["clip_shapes_of_step"] for c in shapes]
        else:
            tokens = [self.tokens_per_sample(self._latent_grid(batch["latents"]))] * self.global_batch
        return training_flops(m, tokens)

    # --- checkpoints -------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict:
        """What a checkpoint records beside the tensors: the model, the step, the position in the data
        (a global sample index) and the training setup a resume is checked against."""
        c = self.config
        return {"step": self.step, "model": dataclasses.asdict(c.model), "preset": c.preset,
                "global_batch": self.global_batch, "consumed_samples": self.step * self.global_batch,
                "layout": {"tensor_model_parallel_size": self.dims.tensor_model_parallel_size,
                           "pipeline_model_parallel_size": self.dims.pipeline_model_parallel_size,
                           "context_parallel_size": self.dims.context_parallel_size,
                           "data_parallel_size": self.dims.data_parallel_size},
                "training": dataclasses.asdict(c.training), "diffusion": dataclasses.asdict(c.diffusion),
                "data": dataclasses.asdict(c.data), "finetune": dataclasses.asdict(c.finetune),
                **({"lora": {**c.finetune.as_meta(), **self._lora_base()}} if c.finetune.lora else {})}

    def _lora_base(self) -> dict:
        if self.lora_base is None:
            raise ValueError("a LoRA run saves adapters that point at their base: set Trainer.lora_base")
        return self.lora_base

    def _checkpoint_keys(self):
        """Which model tensors a checkpoint holds: all, or a LoRA run's adapters alone."""
        if not self.config.finetune.lora:
            return None
        from cogvx_mega.model.lora import is_lora_parameter

        return is_lora_parameter

    def save(self) -> Path:
        """A sharded checkpoint of model, optimizer and step at run_dir/checkpoints/step_<N>/ (all ranks take part).

        With training.async_save the shards are written in the background and the folder appears when the
        save is finalized (`finalize_saves`, called every step and at the end of `fit`). One save is in
        flight at a time: a new save first waits for the previous one.
        """
        self.finish_parameter_sync()
        queue = None
        if self.config.training.async_save:
            self.finalize_saves(blocking=True)
            if self._async_saves is None:
                from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

                self._async_saves = AsyncCallsQueue()
            queue = self._async_saves
        self._last_saved_step = self.step
        return save_sharded_checkpoint(ckpt.step_folder(self.run_dir, self.step), self.ddp_chunks, self.optimizer,
                                       self.checkpoint_meta(), async_queue=queue, on_complete=self._prune_checkpoints,
                                       keep=self._checkpoint_keys())

    def _prune_checkpoints(self) -> None:
        if self.dims.is_logging_rank:  # runs after the save's closing barrier: every rank is past the old ones
            ckpt.prune_checkpoints(self.run_dir, self.config.training.keep_checkpoints)

    def finalize_saves(self, blocking: bool = False) -> None:
        """Complete the asynchronous saves whose shards are written on every rank (all ranks call this)."""
        if self._async_saves is not None:
            self._async_saves.maybe_finalize_async_calls(blocking=blocking)

    def load(self, path: str) -> None:
        """Resume model, optimizer and step from a training checkpoint saved at any layout."""
        meta = read_checkpoint_meta(path)
        if meta.get("format") != SHARDED_FORMAT:
            raise ConfigError("--resume", str(path), "holds weights only (no optimizer state or step); start a run "
                                                     "from it with --init-from instead")
        ckpt.check_same_model(meta, self.config.model, path)
        if bool(meta.get("lora")) != self.config.finetune.lora:
            raise ConfigError("--resume", str(path), "a LoRA checkpoint resumes a LoRA run and a full checkpoint a full "
                                                     "run: keep finetune.lora_rank as it was saved")
        load_sharded_checkpoint(path, self.ddp_chunks, self.optimizer, keep=self._checkpoint_keys())
        use_fused_cpu_adam(self.optimizer)
        self.step = int(meta.get("step", 0))
        self._last_saved_step = self.step
