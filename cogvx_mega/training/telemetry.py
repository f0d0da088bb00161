"""What a run reports beside the loss, every `training.log_interval` steps, into metrics.jsonl and TensorBoard.

* Throughput: model TFLOP/s of the step (`cogvx_mega.model.flops`, the benchmark's formula) per GPU, and MFU
  against the device's dense bf16 peak (FP8 runs: twice that), or `training.peak_tflops`.
* The data loader: `data_wait_s`, the seconds the step waited for its batch.
* The GPU of the logging rank through NVML (pynvml): utilisation, memory used, power, temperature, and
  torch's peak allocation over the interval. Without pynvml or a GPU these fields are left out quietly.
* Host memory of the logging rank (resident set).

TensorBoard event files go to `<run_dir>/tensorboard` (every numeric metric as a scalar, sample paths as
text) when `training.tensorboard` is on.
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Iterator, Optional

import torch

from cogvx_mega.files import video_files
from cogvx_mega.model.flops import peak_tflops_of

logger = logging.getLogger(__name__)


class GpuMonitor:
    """NVML readings of one CUDA device; `read()` is {} when NVML is unavailable."""

    def __init__(self, device: torch.device):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
            if uuid is not None:
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            else:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.nvml = pynvml
        except Exception as error:  # no pynvml, no driver, a container without NVML: telemetry goes on without
            logger.debug("no NVML telemetry: %s", error)
            self.handle = None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        nvml, handle = self.nvml, self.handle
        values = {}
        readers = {
            "gpu_util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "gpu_mem_used_gib": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30,
            "gpu_power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "gpu_temp_c": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
        }
        for name, read in readers.items():
            try:
                values[name] = float(read())
            except Exception:  # a reading a device does not support is left out
                pass
        return values


class Telemetry:
    def __init__(self, config, device: torch.device, run_dir: Path, is_logger: bool, world_size: int,
                 purge_step: Optional[int] = None):
        """`purge_step`: the first step this run writes; TensorBoard hides earlier runs' events from there on."""
        t = config.training
        self.device, self.world_size, self.is_logger = device, world_size, is_logger
        self.model_config = config.model
        self.gpu = GpuMonitor(device) if device.type == "cuda" and is_logger else None
        self.peak_tflops: Optional[float] = t.peak_tflops
        if self.peak_tflops is None and device.type == "cuda":
            self.peak_tflops = peak_tflops_of(torch.cuda.get_device_name(device), fp8=config.model.fp8 is not None)
        self.writer = None
        self.wandb_run = start_wandb(config, run_dir) if is_logger and t.wandb_project else None
        self.folder = run_dir / "tensorboard"
        if is_logger and t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            with self._writing():
                self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge_step)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """TensorBoard's writer thread hands a failed write (a full disk) to the next call without the file's
        name: the error names the event folder."""
        try:
            yield
        except OSError as error:
            if error.filename is not None or error.errno is None:
                raise
            raise OSError(error.errno, error.strerror, str(self.folder)) from error

    def step_fields(self, flops: float, elapsed: float, data_wait: float) -> dict[str, float]:
        """The fields of one logged step (every rank may call it; only the logging rank reads devices)."""
        tflops = flops / elapsed / self.world_size / 1e12  # per GPU
        fields = {"tflops_per_gpu": tflops, "data_wait_s": data_wait}
        if self.peak_tflops:
            fields["mfu"] = tflops / self.peak_tflops
        if not self.is_logger:
            return fields
        if self.gpu is not None:
            fields.update(self.gpu.read())
        if self.device.type == "cuda":
            fields["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            import psutil

            fields["host_rss_gib"] = psutil.Process(os.getpid()).memory_info().rss / 2**30
        except Exception:
            pass
        return fields

    def write(self, metrics: dict) -> None:
        """TensorBoard scalars of a metrics record (logging rank), and the same to W&B (training.wandb_project)."""
        if self.wandb_run is not None:
            self.write_wandb(metrics)
        if self.writer is None:
            return
        step = metrics["step"]
        with self._writing():
            for name, value in metrics.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"train/{name}", value, step)
                elif name.endswith("_by_bin") and isinstance(value, list):  # validation loss per timestep bin
                    for index, bin_value in enumerate(value):
                        self.writer.add_scalar(f"{name}/bin_{index:02d}", bin_value, step)
            if metrics.get("samples"):
                self.writer.add_text("samples", "\n".join(metrics["samples"]), step)
                for index, path in enumerate(video_files(metrics["samples"])):
                    self.add_video(f"samples/sample_{index:02d}", self.folder.parent / path, step)
            if metrics.get("skipped"):
                self.writer.add_text("skipped_steps", f"step {step}: {metrics.get('skip_reason')}", step)

    def add_video(self, tag: str, path: Path, step: int) -> None:
        """A sample video file in TensorBoard's images tab as an animated GIF: what `SummaryWriter.add_video` writes,
        encoded here with Pillow (torch's add_video needs moviepy 1.x's `moviepy.editor`, which moviepy 2 removed,
        and prints instead of failing without it)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        from cogvx_mega.vae.io import read_video, uint8_frames

        video, fps = read_video(str(path))
        frames = uint8_frames(video)  # [T, H, W, 3]
        image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3,
                              encoded_image_string=gif_bytes(frames, fps))
        with self._writing():
            self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def write_wandb(self, metrics: dict) -> None:
        """The scalars TensorBoard gets (per-bin lists as one scalar a bin) and the sample videos, at the step."""
        import wandb

        values = {}
        for name, value in metrics.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"train/{name}"] = value
            elif name.endswith("_by_bin") and isinstance(value, list):
                values.update({f"{name}/bin_{i:02d}": v for i, v in enumerate(value)})
        for index, path in enumerate(video_files(metrics.get("samples") or [])):
            values[f"samples/sample_{index:02d}"] = wandb.Video(str(self.folder.parent / path), format="mp4")
        self.wandb_run.log(values, step=metrics["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.writer is not None:
            with self._writing():
                self.writer.flush()
                self.writer.close()


def gif_bytes(frames, fps: float) -> bytes:
    """uint8 frames [T, H, W, 3] as an animated GIF that loops (Pillow)."""
    import io

    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=max(1, round(1000 / max(fps, 1e-3))))
    return buffer.getvalue()


WANDB_ID_FILE = "wandb_run_id"


def start_wandb(config, run_dir: Path):
    """The W&B run of this training run (training.wandb_project, wandb_mode): its id is kept in
    <run_dir>/wandb_run_id, so a resumed run goes on logging into the same W&B run; files under <run_dir>/wandb."""
    try:
        import wandb
    except ImportError:
        from cogvx_mega.config.errors import ConfigError

        raise ConfigError("training.wandb_project", config.training.wandb_project, "W&B logging needs the wandb "
                                                                                  "package: pip install wandb") from None
    id_file = Path(run_dir) / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    if not id_file.is_file():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    return wandb.init(project=config.training.wandb_project, id=run_id, resume="allow", dir=str(run_dir),
                      mode=config.training.wandb_mode, config=config.to_dict(), name=Path(run_dir).name)

