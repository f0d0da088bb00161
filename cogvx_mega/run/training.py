"""A training run's setup, in one place for the CLI (`cogvx train`), the demo and the Python API: every check that
can fail, before anything is written (one clear error); the process groups; the data and the sampler; the model,
its weights (a resumed checkpoint, `--init-from` weights with a `--init-lora` file merged, a LoRA run's base) and
its LoRA adapters; the trainer. Then the training."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from cogvx_mega.config import Config, write_resolved_config
from cogvx_mega.config.errors import ConfigError, check_writable
from cogvx_mega.data.accounting import training_bucket_table
from cogvx_mega.model.transformer import build_model_chunks
from cogvx_mega.parallel.state import ParallelDims, initialize_parallel
from cogvx_mega.tools.training_data import open_training_data, open_validation_data
from cogvx_mega.training import checkpoint as ckpt
from cogvx_mega.training.checkpointer import Checkpointer, Start
from cogvx_mega.training.pretrained import load_pretrained_weights
from cogvx_mega.training.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """A run ready to train: `fit()` trains it to `training.steps` and releases its data readers."""

    config: Config
    dims: ParallelDims
    trainer: Trainer
    dataset: object
    start: Start

    def fit(self) -> list[dict]:
        """Train to `training.steps`; the logging rank ends with the final loss and the checkpoint's path."""
        try:
            history = self.trainer.fit()
        finally:
            self.close()
        if self.dims.is_logging_rank:
            checkpoint = ckpt.step_folder(self.trainer.run_dir, self.trainer.step)
            loss = f"final loss {history[-1]['loss']:.4f}; " if history else ""
            logger.info("trained to step %d/%d: %scheckpoint %s", self.trainer.step, self.config.training.steps,
                        loss, checkpoint)
        return history

    def close(self) -> None:
        if hasattr(self.dataset, "close"):
            self.dataset.close()  # online mode's decode threads


def prepare_training(config: Config, resume: Optional[str] = None, init_from: Optional[str] = None,
                     init_lora: Optional[str] = None, verify: bool = True) -> TrainingRun:
    """Everything before the first step (see the module). The weights come from `resume` (model, optimizer,
    step: 'auto' or a checkpoint folder) or `init_from` (weights only, step 0); with both, an existing checkpoint
    of the run wins, so a requeued fine-tuning job continues. `verify=False` reads --init-from weights (and a LoRA
    run's base) without checking their files (a resumed checkpoint is always verified)."""
    device = config.training.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda", "no CUDA device is visible; pass --device cpu")
    check_writable("--run-dir", config.training.run_dir, folder=True)
    dims = initialize_parallel(config.parallel, device=device, seed=config.training.seed)
    checkpointer = Checkpointer(config, dims)
    global_batch = config.check_world(dims.data_parallel_size)
    start = checkpointer.plan_start(resume, init_from, init_lora, global_batch, verify=verify)
    dataset = open_training_data(config, global_batch)
    valid_dataset = open_validation_data(config) if config.training.valid_every else None
    sampler = None
    if config.training.sample_every:
        from cogvx_mega.tools.sample import training_sampler

        sampler = training_sampler(config)
    ckpt.check_shared_filesystem(config.training.run_dir)
    # every check has passed: from here on the run writes
    checkpointer.begin(start)
    if dims.is_logging_rank:
        write_resolved_config(config, config.training.run_dir)
    chunks = build_model_chunks(config.model, config.parallel, device=device, seed=config.training.seed,
                                recompute=config.training.recompute,
                                recompute_num_layers=config.training.recompute_num_layers)
    load_start_weights(chunks, start, config, dims)
    trainer = Trainer(config, dims, chunks, dataset, sampler=sampler, checkpointer=checkpointer,
                      valid_dataset=valid_dataset)
    if start.resume is not None:
        trainer.load(start.resume)
        if dims.is_logging_rank:
            logger.info("resumed from %s at step %d%s", start.resume, trainer.step,
                        " (--init-from ignored: the run has a checkpoint)" if start.init_from else "")
    if dims.is_logging_rank:  # the buckets it trains on (and any it cannot), at the step it starts
        logger.info("%s", training_bucket_table(dataset, global_batch, step=trainer.step))
    return TrainingRun(config, dims, trainer, dataset, start)


def load_start_weights(chunks: list, start: Start, config: Config, dims: ParallelDims) -> None:
    """The weights the run starts from (before the optimizer exists): `--init-from` ones at a fresh start, a
    resumed LoRA run's base (its checkpoint holds the adapters alone); then a LoRA run's adapters."""
    if start.resume is None and start.init_from is not None:
        load_pretrained_weights(chunks, start.init_from, config.model, lora=start.init_lora)
        if dims.is_logging_rank:
            merged = f" with {start.init_lora} merged" if start.init_lora else ""
            logger.info("initialised the weights from %s%s", start.init_from, merged)
    elif start.lora_base is not None:
        load_pretrained_weights(chunks, start.lora_base["base"], config.model, lora=start.lora_base["base_lora"])
    if config.finetune.lora:
        from cogvx_mega.model.lora import apply_lora

        adapted = apply_lora(chunks, config.finetune, config.training.seed)
        if dims.is_logging_rank:
            logger.info("LoRA rank %d on %d linears of this rank (%s); the base weights are frozen",
                        config.finetune.lora_rank, adapted, ", ".join(config.finetune.lora_targets))


def run_training(config: Config, resume: Optional[str] = None, init_from: Optional[str] = None,
                 init_lora: Optional[str] = None, verify: bool = True) -> list[dict]:
    """`cogvx train`: prepare the run, train it; returns each step's metrics."""
    return prepare_training(config, resume, init_from, init_lora, verify).fit()
