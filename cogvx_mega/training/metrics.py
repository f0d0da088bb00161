"""What a training run shows while it trains: one row per step in `<run_dir>/metrics.jsonl` (step, loss,
grad_norm, lr, throughput and, every `training.log_interval` steps, the telemetry of `training.telemetry`), the
same in TensorBoard, and a progress bar, all on the logging rank."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from cogvx_mega.config.schema import Config
from cogvx_mega.model.flops import training_flops
from cogvx_mega.model.transformer import sequence_length
from cogvx_mega.parallel.state import ParallelDims
from cogvx_mega.training.telemetry import Telemetry

logger = logging.getLogger(__name__)


def latent_grid(latents: torch.Tensor) -> tuple[int, int, int]:
    """(frames, height, width) of a [B, T, C, H, W] latent batch (buckets make it differ from step to step)."""
    return latents.shape[1], latents.shape[3], latents.shape[4]


class MetricsLog:
    def __init__(self, config: Config, dims: ParallelDims, run_dir: Path, device: torch.device, first_step: int):
        self.config = config
        self.is_logger = dims.is_logging_rank
        self.file = Path(run_dir) / "metrics.jsonl"
        self.telemetry = Telemetry(config, device, Path(run_dir), self.is_logger, dims.world_size)
        self.progress = None
        if self.is_logger:
            from tqdm.auto import tqdm

            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.progress = tqdm(total=config.training.steps, initial=first_step, desc="train", unit="step",
                                 dynamic_ncols=True)

    def step_fields(self, step: int, batch: dict, global_batch: int, tokens_per_sample: int, elapsed: float,
                    data_wait: float) -> dict:
        """Throughput of the step (samples/s, tokens/s; for packs the clips, real tokens and packing efficiency),
        its progressive-training stage, and every `training.log_interval` steps the telemetry (model TFLOP/s and
        MFU, data wait, GPU and host readings)."""
        if "packs" in batch:  # global_batch counts packs; tokens are the packs' real tokens
            fields = {"clips": batch["clips_in_step"], "samples_per_s": batch["clips_in_step"] / elapsed,
                      "tokens_per_s": batch["real_tokens"] / elapsed,
                      "packing_efficiency": batch["real_tokens"] / (global_batch * batch["pack_tokens"])}
        else:
            fields = {"samples_per_s": global_batch / elapsed,
                      "tokens_per_s": global_batch * tokens_per_sample / elapsed}
        if "stage" in batch:
            fields["stage"] = batch["stage"]
        if step % self.config.training.log_interval == 0:
            fields.update(self.telemetry.step_fields(self.step_flops(batch, global_batch, tokens_per_sample),
                                                     elapsed, data_wait))
        return fields

    def step_flops(self, batch: dict, global_batch: int, tokens_per_sample: int) -> float:
        """Model FLOPs of the step over all ranks (`cogvx_mega.model.flops`)."""
        m = self.config.model
        if "packs" in batch:
            tokens = [sequence_length(m, c.latent_frames, c.latent_height, c.latent_width, c.text_length)
                      for shapes in batch["clip_shapes_of_step"] for c in shapes]
        else:
            tokens = [tokens_per_sample] * global_batch
        return training_flops(m, tokens)

    def record(self, metrics: dict) -> None:
        """One step's row: metrics.jsonl, TensorBoard and the progress bar (the logging rank)."""
        if not self.is_logger:
            return
        with self.file.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.telemetry.write(metrics)
        self.progress.update(1)
        if metrics["step"] % self.config.training.log_interval == 0:
            self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.telemetry.close()
