"""Media files the data tests make for themselves: moving-shape clips encoded with real codecs (VP9 in
WebM, MJPEG in AVI, H.264 in MP4), PNG and JPEG images, and broken files (truncated, empty, text)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def moving_square(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """[frames, height, width, 3] uint8: a coloured square crossing a dark background."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(80, 255, size=3)
    video = np.full((frames, height, width, 3), 20, dtype=np.uint8)
    size = max(2, min(height, width) // 4)
    for t in range(frames):
        row = (height // 3 + t * 2) % max(1, height - size)
        col = (t * 3) % max(1, width - size)
        video[t, row:row + size, col:col + size] = colour
    return video


def write_video(path: Path, frames: np.ndarray, fps: int, codec: str, pixel_format: str,
                options: dict | None = None) -> Path:
    from cogvx_mega.data.synthetic import write_video_file

    return write_video_file(path, frames, fps, codec, pixel_format, options)


def make_media_folder(root: Path) -> dict[str, dict]:
    """Good clips and images with sidecar captions, and bad files; returns name -> what was made."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    made = {}
    good = [("clip_vp9.webm", "libvpx-vp9", "yuv420p", 24, 17, 64, 96),
            ("clip_mjpeg.avi", "mjpeg", "yuvj420p", 12, 9, 48, 80),
            ("clip_h264.mp4", "libx264", "yuv420p", 30, 25, 72, 128),
            ("nested/clip_h264_small.mp4", "libx264", "yuv420p", 8, 13, 32, 48)]
    for index, (name, codec, pixel_format, fps, frames, height, width) in enumerate(good):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_video(path, moving_square(frames, height, width, seed=index), fps, codec, pixel_format)
        path.with_suffix(".txt").write_text(f"a square moving in clip {index}\n")
        made[name] = {"kind": "video", "fps": fps, "frames": frames, "height": height, "width": width}
    for name, size in (("image.png", (40, 56)), ("photo.jpg", (64, 48))):
        Image.fromarray(moving_square(1, size[0], size[1], seed=7)[0]).save(root / name)
        (root / name).with_suffix(".txt").write_text(f"a still image {name}\n")
        made[name] = {"kind": "image", "fps": None, "frames": 1, "height": size[0], "width": size[1]}
    whole = (root / "clip_h264.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # index (moov) at the end: cut off
    faststart = write_video(root / "faststart.tmp.mp4", moving_square(25, 72, 128), 30, "libx264", "yuv420p",
                            {"movflags": "faststart"})  # index first: a cut file still lists all frames
    data = faststart.read_bytes()
    faststart.unlink()
    (root / "truncated_faststart.mp4").write_bytes(data[: len(data) * 2 // 3])
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("this is a text file, not a video\n")
    for name in ("truncated.mp4", "truncated_faststart.mp4", "empty.mp4", "notes.mp4"):
        (root / name).with_suffix(".txt").write_text("a caption for a broken file\n")
        made[name] = {"kind": "broken"}
    return made
