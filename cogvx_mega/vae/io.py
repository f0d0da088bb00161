"""Video files <-> [B, 3, T, H, W] tensors in [-1, 1] (PyAV), and latent files (safetensors), for `cogvx vae`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.files import atomic_file


def _import_av():
    try:
        import av
    except ImportError as error:  # pragma: no cover - depends on the extra
        raise ConfigError("video file", None, "reading and writing video needs PyAV: pip install -e .[video]") from error
    return av


def read_video(path: str, frames: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """The first `frames` frames (all by default) as [1, 3, T, H, W] in [-1, 1], and the frame rate."""
    av = _import_av()
    if not Path(path).is_file():
        raise ConfigError("VIDEO", path, "no such file")
    decoded = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 8)
            for frame in container.decode(stream):
                decoded.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                if frames is not None and len(decoded) == frames:
                    break
    except av.error.FFmpegError as error:
        raise ConfigError("VIDEO", path, f"cannot be decoded ({error}); pass an mp4/mkv/webm video") from None
    if not decoded or (frames is not None and len(decoded) < frames):
        raise ConfigError("VIDEO", path, f"has {len(decoded)} frames, fewer than the {frames} asked for")
    video = torch.stack(decoded).permute(3, 0, 1, 2)[None].float()  # [1, 3, T, H, W]
    return video / 127.5 - 1.0, rate


def encode_frames(path, frames, rate, codec: str = "libx264", pixel_format: str = "yuv420p",
                  container_options: Optional[dict] = None, stream_options: Optional[dict] = None) -> Path:
    """The one video writer: uint8 frames [T, H, W, 3] encoded with PyAV (H.264 in MP4, VP9 in WebM, MJPEG in AVI,
    an animated GIF, ...) into a temporary file beside `path`, renamed into place when complete."""
    av = _import_av()
    with atomic_file(path) as tmp:
        with av.open(str(tmp), mode="w", options=container_options or {}) as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pixel_format
            if stream_options:
                stream.options = stream_options
            for array in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
            container.mux(stream.encode())
    return Path(path)


def uint8_frames(video: torch.Tensor):
    """[1, 3, T, H, W] in [-1, 1] -> uint8 frames [T, H, W, 3] (numpy)."""
    return ((video[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def write_video(path: str, video: torch.Tensor, fps: float = 8.0) -> None:
    """Write [1, 3, T, H, W] in [-1, 1] as H.264 (yuv420p needs even sizes; odd ones are cropped by one)."""
    frames = uint8_frames(video)
    height, width = frames.shape[1] - frames.shape[1] % 2, frames.shape[2] - frames.shape[2] % 2
    encode_frames(path, frames[:, :height, :width].copy(), max(1, round(fps)), stream_options={"crf": "12"})


def write_gif(path: str, video: torch.Tensor, fps: float) -> None:
    """[1, 3, T, H, W] in [-1, 1] as an animated GIF (8-bit RGB palette)."""
    encode_frames(path, uint8_frames(video), max(1, round(fps)), codec="gif", pixel_format="rgb8")


def save_latents(path: str, latents: torch.Tensor, metadata: Optional[dict] = None) -> None:
    """The one latent-file writer (`cogvx vae encode`, `cogvx sample --save-latents`, `sampling.save_latents`):
    a safetensors file holding `latents` as given and, when there is any, `metadata` under "cogvx"; written
    whole or not at all, readable as the umask says (`cogvx_mega.files.atomic_file`)."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({"latents": latents.detach().contiguous().cpu()}, str(tmp),
                  metadata={"cogvx": json.dumps(metadata)} if metadata else None)


def load_latents(path: str) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ConfigError("LATENTS", path, "no such file")
    try:
        with safe_open(path, framework="pt") as handle:
            latents = handle.get_tensor("latents")
            metadata = json.loads((handle.metadata() or {}).get("cogvx", "{}"))
    except Exception as error:  # safetensors raises several types for a foreign file
        raise ConfigError("LATENTS", path, f"is not a latent file written by `cogvx vae encode` ({error})") from None
    return latents, metadata
