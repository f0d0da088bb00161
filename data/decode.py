"""Decoding clips into training frames: [3, T, H, W] float in [-1, 1], T = 1 + 4k.

One interface (`decode_clip(record, spec)`), the backend chosen in one place (`choose_backend`): images
through Pillow as 1-frame clips (from their file or, for an image inside a tar shard, a record with `member`,
`offset` and `size` from `image_shards.py`, from the member's bytes: the same decoder, the same pixels); videos
through NVIDIA DALI on the GPU (NVDEC, from the encoded bytes) when the clip is decoded for a CUDA device,
through DALI's CPU decoder for the codecs it handles (VP9, MJPEG), and through PyAV for the rest (H.264, HEVC,
AV1, ... on the CPU). DALI is an optional extra: without it every video goes through PyAV.

Frames are sampled at the target frame rate (the source frame shown at each target time), cut to the
longest 1 + 4k count the clip fills up to the requested count, the short side resized keeping the
aspect ratio so that the frame covers the target size, centre-cropped to it, and scaled to [-1, 1].
"""
from __future__ import annotations

import functools
import io
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from cogvx_mega.data.manifest import IMAGE_SUFFIXES, MediaError, _import_av


@dataclass(frozen=True)
class DecodeSpec:
    """What a training clip looks like: `frames` (1 + 4k) at `fps`, `height` x `width` pixels."""

    frames: int
    height: int
    width: int
    fps: float = 8.0
    temporal_compression_ratio: int = 4


def longest_usable_count(available: int, wanted: int, ratio: int = 4) -> int:
    """The longest 1 + ratio*k frame count <= min(available, wanted); 0 if not even one frame is there."""
    count = min(available, wanted)
    return 0 if count < 1 else 1 + ratio * ((count - 1) // ratio)


def frame_indices(source_fps: float, source_frames: int, spec: DecodeSpec, start: Optional[float] = None,
                  end: Optional[float] = None) -> list[int]:
    """Source frame indices for the target frames: target frame k shows the source frame on screen at
    time start + k / fps. Raises MediaError when the clip has no frame to give."""
    first = int(math.floor((start or 0.0) * source_fps + 1e-9))
    last = source_frames if end is None else min(source_frames, int(math.ceil(end * source_fps - 1e-9)))
    step = source_fps / spec.fps if spec.fps < source_fps else 1.0  # source frames per target frame
    available = max(0, math.ceil((last - first) / step - 1e-9))  # k with first + floor(k * step) < last
    count = longest_usable_count(available, spec.frames, spec.temporal_compression_ratio)
    if count == 0:
        raise MediaError(f"no frame between {start or 0.0:.2f}s and {end if end is not None else 'the end'}")
    return [first + int(math.floor(k * step + 1e-9)) for k in range(count)]


def resize_and_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, height, width] in [-1, 1]: short side to cover, centre crop."""
    video = frames.permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    source_h, source_w = video.shape[2:]
    scale = max(height / source_h, width / source_w)
    resized_h, resized_w = max(height, round(source_h * scale)), max(width, round(source_w * scale))
    if (resized_h, resized_w) != (source_h, source_w):
        video = F.interpolate(video, size=(resized_h, resized_w), mode="bilinear", align_corners=False,
                              antialias=scale < 1)
    top, left = (resized_h - height) // 2, (resized_w - width) // 2
    video = video[:, :, top:top + height, left:left + width]
    return (video / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()  # [3, T, h, w]


def media_name(record: dict) -> str:
    """How a record's media is named in messages: its path, or TAR:MEMBER for an image inside a tar shard."""
    return f"{record['path']}:{record['member']}" if record.get("member") else record["path"]


def open_media(record: dict):
    """What a record's media is read from: its file's path, or for an image inside a tar shard (`member`, `offset`,
    `size`: where the member's bytes lie in the tar `path`) those bytes, read at once, as a file object. OSError
    when the tar cannot be read; MediaError when it ends before the member does."""
    if not record.get("member"):
        return record["path"]
    offset, size = int(record["offset"]), int(record["size"])
    with open(record["path"], "rb") as file:
        file.seek(offset)
        data = file.read(size)
    if len(data) != size:
        raise MediaError(f"the tar ends inside {record['member']} ({len(data)} of its {size} bytes at offset "
                         f"{offset}); index the shards again")
    return io.BytesIO(data)


def decode_image(source) -> torch.Tensor:
    """uint8 [1, H, W, 3] of an image file (a path, or a file object holding the file's bytes: the same decoder,
    the same pixels)."""
    from PIL import Image

    try:
        with Image.open(source) as image:
            array = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    except OSError as error:
        raise MediaError(f"not a readable image ({error})") from None
    return array[None]  # [1, H, W, 3]


def decode_video_pyav(path: str, indices: list[int]) -> torch.Tensor:
    """uint8 [len(indices), H, W, 3]: the frames at `indices` (sorted, repeats allowed), decoded in order."""
    av = _import_av()
    wanted = sorted(set(indices))
    frames: dict[int, torch.Tensor] = {}
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for number, frame in enumerate(container.decode(stream)):
                if number in frames or number not in wanted:
                    if number > wanted[-1]:
                        break
                    continue
                frames[number] = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                if len(frames) == len(wanted):
                    break
    except (av.error.FFmpegError, ValueError) as error:
        raise MediaError(f"decoding failed ({type(error).__name__}: {error})") from None
    missing = [i for i in wanted if i not in frames]
    if missing:
        raise MediaError(f"decoding stopped before frame {missing[0]} (the file ends early)")
    return torch.stack([frames[i] for i in indices])


DALI_CPU_CODECS = ("vp9", "mjpeg")


@functools.lru_cache(maxsize=None)
def dali_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nvidia.dali") is not None


class DaliVideoDecoder:
    """DALI's video decoder from encoded bytes ('cpu': its CPU decoder; 'cuda:N': NVDEC on GPU N through the
    mixed operator). A pipeline is built once per thread and device and reused (a DALI pipeline is not for
    concurrent use, and the decode worker threads each run their own); the frames to decode are an input of
    each run. The pipelines live in one process-wide table, not in thread-local storage: a forked child
    (megatron's checkpoint writers) frees the thread-locals of the threads it lacks, and a DALI pipeline
    destroyed there waits forever for its executor threads."""

    _pipelines: dict[tuple[int, str], object] = {}

    @classmethod
    def pipeline(cls, device: str):
        key = (threading.get_ident(), device)
        if key not in cls._pipelines:
            from nvidia.dali import fn, pipeline_def, types

            gpu = device.startswith("cuda")

            @pipeline_def(batch_size=1, num_threads=1, device_id=cuda_index(device) if gpu else None,
                          prefetch_queue_depth=1)
            def decode():
                encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
                frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
                return fn.decoders.video(encoded, device="mixed" if gpu else "cpu", frames=frames)

            built = decode()
            built.build()
            cls._pipelines[key] = built
        return cls._pipelines[key]

    @classmethod
    def decode(cls, path: str, indices: list[int], device: str) -> torch.Tensor:
        """uint8 [len(indices), H, W, 3] on `device` (a CUDA tensor straight from NVDEC on the GPU)."""
        pipe = cls.pipeline(device)
        wanted = sorted(set(indices))
        pipe.feed_input("encoded", [np.fromfile(path, dtype=np.uint8)])
        pipe.feed_input("frames", [np.asarray(wanted, dtype=np.int32)])
        try:
            (output,) = pipe.run()
        except RuntimeError as error:
            cls._pipelines.pop((threading.get_ident(), device), None)  # a failed run leaves it unusable
            raise MediaError(f"DALI could not decode it ({str(error).splitlines()[0][:200]})") from None
        if device.startswith("cuda"):
            frames = torch.from_dlpack(output[0]._as_dlpack()) if hasattr(output[0], "_as_dlpack") else \
                torch.as_tensor(np.asarray(output.as_cpu()[0]))
        else:
            frames = torch.from_numpy(np.array(output[0]))
        position = {index: i for i, index in enumerate(wanted)}
        return frames[[position[i] for i in indices]]


def cuda_index(device: str) -> int:
    """'cuda:N' -> N; plain 'cuda' -> the calling thread's current CUDA device."""
    if ":" in device:
        return int(device.split(":", 1)[1])
    return torch.cuda.current_device()


def choose_backend(record: dict, device: str = "cpu") -> str:
    """The one place that picks how a clip is decoded: 'image' (Pillow), 'dali-gpu', 'dali-cpu' or 'pyav'."""
    if record.get("kind") == "image" or Path(record["path"]).suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    if dali_available():
        if device.startswith("cuda"):
            return "dali-gpu"
        if record.get("codec") in DALI_CPU_CODECS:
            return "dali-cpu"
    return "pyav"


def decode_clip(record: dict, spec: DecodeSpec, device: str = "cpu", backend: Optional[str] = None) -> torch.Tensor:
    """A manifest record -> float [3, T, spec.height, spec.width] in [-1, 1] (T = 1 + 4k <= spec.frames), on
    `device` for the DALI GPU path, else on the CPU. `backend` overrides `choose_backend` (benchmarks, tests).
    Raises MediaError with the reason when the clip cannot be used (the caller skips and counts it)."""
    backend = backend or choose_backend(record, device)
    if backend == "image":
        frames = decode_image(open_media(record))
    elif record.get("member"):
        raise MediaError("only images are read from inside a tar shard")
    else:
        indices = frame_indices(float(record["fps"]), int(record["frames"]), spec, record.get("start"),
                                record.get("end"))
        if backend == "pyav":
            frames = decode_video_pyav(record["path"], indices)
        elif backend in ("dali-cpu", "dali-gpu"):
            gpu = device if device.startswith("cuda") else "cuda"
            frames = DaliVideoDecoder.decode(record["path"], indices, gpu if backend == "dali-gpu" else "cpu")
        else:
            raise ValueError(f"unknown decode backend {backend!r}")
    return resize_and_crop(frames, spec.height, spec.width)
