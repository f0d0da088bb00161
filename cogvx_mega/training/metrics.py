"""What a training run shows while it trains: one row per step in `<run_dir>/metrics.jsonl` (step, loss,
grad_norm, lr, throughput and, every `training.log_interval` steps, the telemetry of `training.telemetry`), the
same in TensorBoard, and on the terminal a progress bar, or in a batch job's log (stderr not a terminal) one plain
line every `training.log_interval` steps; all on the logging rank.

metrics.jsonl holds one row per step of the run's line: a run that starts at step S (a resume, or step 0) moves
the rows of later steps, left by a run that went on past its last checkpoint, to `metrics.replaced.jsonl` (each
with `replaced_at_start_step`), and TensorBoard hides their events (`purge_step`), so plots never mix two runs."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from cogvx_mega.config.schema import Config
from cogvx_mega.model.flops import training_flops
from cogvx_mega.model.transformer import sequence_length
from cogvx_mega.parallel.state import ParallelDims
from cogvx_mega.training.telemetry import Telemetry

logger = logging.getLogger(__name__)


METRICS_FILE = "metrics.jsonl"
REPLACED_FILE = "metrics.replaced.jsonl"


def log_line(metrics: dict, total_steps: int) -> str:
    """The plain line of a logged step: `step N/M | loss | grad_norm | lr | samples/s | TFLOP/s` (what the step
    has of them; a skipped step says so)."""
    parts = [f"step {metrics['step']}/{total_steps}", f"loss {metrics['loss']:.4f}"]
    if metrics.get("grad_norm") is not None:
        parts.append(f"grad_norm {metrics['grad_norm']:.3f}")
    parts.append(f"lr {metrics['lr']:.3e}")
    if "samples_per_s" in metrics:
        parts.append(f"samples/s {metrics['samples_per_s']:.2f}")
    if "tflops_per_gpu" in metrics:
        parts.append(f"TFLOP/s {metrics['tflops_per_gpu']:.3g}")
    if metrics.get("skipped"):
        parts.append(f"skipped: {metrics.get('skip_reason')}")
    return " | ".join(parts)


def set_aside_rows_after(run_dir: Path, step: int) -> int:
    """Keep the rows of steps 1..`step` in run_dir/metrics.jsonl and append the others (and any line that does not
    parse, e.g. one cut short by a kill) to metrics.replaced.jsonl; returns how many were moved. The new
    metrics.jsonl replaces the old one in one rename."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return 0
    kept, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            moved.append(json.dumps({"replaced_at_start_step": step, "unreadable_row": line}))
            continue
        if row_step <= step:
            kept.append(line)
        else:
            moved.append(json.dumps({**row, "replaced_at_start_step": step}))
    if not moved:
        return 0
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(k + "\n" for k in kept))
        append_whole(run_dir / REPLACED_FILE, "".join(m + "\n" for m in moved))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(moved)


def append_whole(path: Path, text: str) -> None:
    """Append `text` to `path` whole or not at all: a write that fails part-way (a full disk) cuts the file back
    to where it ended, so the rows before stay as they were and no half row is left; the OSError names `path`."""
    data = memoryview(text.encode())
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.fstat(handle).st_size
        try:
            while data:
                data = data[os.write(handle, data):]
        except OSError as error:
            os.ftruncate(handle, end)
            raise OSError(error.errno, error.strerror, str(path)) from error
    finally:
        os.close(handle)


def latent_grid(latents: torch.Tensor) -> tuple[int, int, int]:
    """(frames, height, width) of a [B, T, C, H, W] latent batch (buckets make it differ from step to step)."""
    return latents.shape[1], latents.shape[3], latents.shape[4]


class MetricsLog:
    def __init__(self, config: Config, dims: ParallelDims, run_dir: Path, device: torch.device, first_step: int):
        self.config = config
        self.is_logger = dims.is_logging_rank
        self.file = Path(run_dir) / METRICS_FILE
        self.progress = None
        if self.is_logger:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            replaced = set_aside_rows_after(Path(run_dir), first_step)
            if replaced:
                logger.warning("metrics.jsonl held %d rows after step %d (a run that went on past its last "
                               "checkpoint): moved to %s", replaced, first_step, REPLACED_FILE)
        self.telemetry = Telemetry(config, device, Path(run_dir), self.is_logger, dims.world_size,
                                   purge_step=first_step + 1)
        if self.is_logger and sys.stderr.isatty():
            from tqdm.auto import tqdm

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
        if "data_filters" in batch:  # data.filters: the clips the step's stage draws from, each filter's drops
            fields["data_clips_kept"] = batch["data_filters"]["kept"]
            fields["data_filter_dropped"] = batch["data_filters"]["dropped"]
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
        append_whole(self.file, json.dumps(metrics) + "\n")
        self.telemetry.write(metrics)
        logged = metrics["step"] % self.config.training.log_interval == 0
        if self.progress is not None:
            self.progress.update(1)
            if logged:
                self.progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        elif logged:
            logger.info(log_line(metrics, self.config.training.steps))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.telemetry.close()
