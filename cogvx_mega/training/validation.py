"""Validation loss by timestep (issue 30): every `training.valid_every` steps, the v-prediction loss of
`training.valid_samples` clips of `data.valid` at one timestep in each of `training.valid_bins` equal bins of
0..999 (the paper compares runs by their loss at each timestep, its Figure 10).

Everything is fixed and keyed: the clips are the validation set's first batch (global validation slots
0..N-1, split over data-parallel ranks like a training step's), the timestep of clip i in bin k is
k * width + a keyed offset in the bin, its noise is keyed on (seed, bin, slot) (streams VALID_TIMESTEP and
VALID_NOISE), text is never dropped. So the numbers are the same at any layout and after a resume, and bin k's
loss is the mean over the clips, the overall loss the mean over the bins (every bin has the same clips).

The forward runs through megatron's schedule (forward only) on the run's own chunks: one micro-batch holds
clips of one bin, so each bin's loss is the mean of its micro-batches (context-parallel shares summed, sent
from the last pipeline stage, averaged over data-parallel replicas). With a weight average (`training.ema`) the
same is measured on the averaged weights, swapped in for the call.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.diffusion.loss import NoisedBatch
from cogvx_mega.diffusion.randomness import Stream, slot_normal, slot_seed
from cogvx_mega.training.metrics import latent_grid


def check_validation(training, data_parallel_size: int) -> None:
    """training.valid_samples splits into whole micro-batches on every data-parallel rank."""
    unit = data_parallel_size * training.micro_batch_size
    if training.valid_samples % unit:
        raise ConfigError("training.valid_samples", training.valid_samples,
                          f"use a multiple of micro_batch_size x data-parallel size = {unit}")
    if 1000 % training.valid_bins:  # the bins cut 0..999 evenly
        raise ConfigError("training.valid_bins", training.valid_bins, "use a divisor of 1000 (e.g. 10)")


def validation_timesteps(slots, bin_index: int, bins: int, seed: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """[len(slots)] timesteps of bin `bin_index`: its start plus a keyed offset inside it per clip."""
    width = num_train_timesteps // bins
    return torch.tensor([bin_index * width + slot_seed(seed, bin_index, slot, Stream.VALID_TIMESTEP) % width
                         for slot in slots], dtype=torch.long)


class Validator:
    """Runs the validation of a `Trainer` (its chunks, layout and forward step) on a validation dataset."""

    def __init__(self, trainer, dataset):
        t = trainer.config.training
        check_validation(t, trainer.dims.data_parallel_size)
        self.trainer, self.dataset = trainer, dataset
        self.samples, self.bins, self.seed = t.valid_samples, t.valid_bins, t.seed
        per_rank = self.samples // trainer.dims.data_parallel_size
        self.slots = range(trainer.dims.data_parallel_rank * per_rank, (trainer.dims.data_parallel_rank + 1) * per_rank)
        self._batch = None

    def batch(self) -> dict:
        """This rank's validation clips (read once)."""
        if self._batch is None:
            self._batch = self.dataset.step_batch(0, self.slots, self.samples, self.seed)
        return self._batch

    def measure(self) -> dict:
        """{'valid_loss', 'valid_loss_by_bin'} and, with a weight average, the same with `_ema` (every rank)."""
        trainer = self.trainer
        trainer.finish_parameter_sync()
        out = self._losses("valid_loss")
        if trainer.ema is not None:
            with trainer.ema.swapped_in():
                out.update(self._losses("valid_loss_ema"))
        return out

    @torch.no_grad()
    def _losses(self, name: str) -> dict:
        trainer, batch = self.trainer, self.batch()
        latents, micro = batch["latents"], trainer.config.training.micro_batch_size
        micro_batches = []
        for bin_index in range(self.bins):
            randomness = {"noise": slot_normal(latents.shape[1:], self.slots, seed=self.seed, step=bin_index,
                                               stream=Stream.VALID_NOISE),
                          "timesteps": validation_timesteps(self.slots, bin_index, self.bins, self.seed,
                                                            trainer.config.diffusion.num_train_timesteps),
                          "text_drop_mask": torch.zeros(len(self.slots), dtype=torch.bool),
                          "image_drop_mask": torch.zeros(len(self.slots), dtype=torch.bool)}
            noised = trainer._noise(latents, batch["text_embeds"], randomness, batch.get("image_latents"))
            for start in range(0, len(self.slots), micro):
                micro_batches.append(NoisedBatch(**{f.name: getattr(noised, f.name)[start:start + micro]
                                                    for f in dataclasses.fields(NoisedBatch)}))
        for chunk in trainer.ddp_chunks:
            chunk.eval()
        iterators = [iter(micro_batches) for _ in trainer.ddp_chunks]
        losses = get_forward_backward_func()(
            forward_step_func=trainer._forward_step, data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=trainer.ddp_chunks, num_microbatches=len(micro_batches),
            seq_length=trainer.padded_tokens_per_sample(latent_grid(latents)), micro_batch_size=micro,
            forward_only=True)
        per_bin = self._per_bin(losses, len(micro_batches) // self.bins)
        by_bin = [float(v) for v in per_bin]
        return {name: sum(by_bin) / len(by_bin), f"{name}_by_bin": by_bin}

    def _per_bin(self, losses: list, per_bin: int) -> torch.Tensor:
        """[bins] mean loss of each bin over the whole validation set, the same on every rank."""
        trainer = self.trainer
        values = torch.zeros(self.bins, dtype=torch.float64, device=trainer.device)
        if losses:  # the last pipeline stage
            stacked = torch.stack([m["loss"].double().reshape(()) for m in losses]).reshape(self.bins, per_bin)
            values = stacked.mean(dim=1).to(trainer.device)
            if parallel_state.get_context_parallel_world_size() > 1:  # each CP rank holds its share
                dist.all_reduce(values, group=parallel_state.get_context_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            group = parallel_state.get_pipeline_model_parallel_group()
            dist.broadcast(values, src=dist.get_global_rank(group, group.size() - 1), group=group)
        return trainer._average_over_data_parallel(values)

