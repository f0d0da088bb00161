"""Resolution and duration buckets: every clip goes to its nearest bucket, every batch comes from one.

A bucket is `FRAMESxHEIGHTxWIDTH` in pixels (frames 1 + 4k), e.g. 49x480x720 (landscape), 49x720x480
(portrait), 1x480x720 (images). A clip goes to the bucket that keeps the most of it:
1. only buckets it can fill: at the target frame rate it has at least the bucket's frames (images and
   1-frame buckets always fit each other; a video never goes to a 1-frame bucket while a video bucket fits);
2. of those, the nearest aspect ratio (|log(w/h) - log(W/H)|: cropping loses the least);
3. then the longest duration, then the resolution closest to the clip's own (log of the pixel count).
Clips that fit no bucket are skipped and counted by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from cogvx_mega.config.errors import ConfigError, check_frame_count


@dataclass(frozen=True, order=True)
class Bucket:
    frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str, field: str = "data.buckets") -> "Bucket":
        try:
            frames, height, width = (int(part) for part in str(text).lower().split("x"))
        except ValueError:
            raise ConfigError(field, text, "write a bucket as FRAMESxHEIGHTxWIDTH in pixels, e.g. 49x480x720") from None
        check_frame_count(field, frames, 4)
        if height < 1 or width < 1:
            raise ConfigError(field, text, "height and width must be positive")
        return cls(frames, height, width)


def usable_frames(record: dict, fps: float, ratio: int = 4) -> int:
    """Frames the clip gives at the target rate, cut to 1 + 4k (images: 1)."""
    if record.get("kind") == "image" or int(record.get("frames", 1)) <= 1:
        return 1
    source_fps = float(record["fps"])
    frames = int(record["frames"])
    if record.get("start") is not None or record.get("end") is not None:
        first = (record.get("start") or 0.0) * source_fps
        last = frames if record.get("end") is None else min(frames, record["end"] * source_fps)
        frames = max(0, int(last - first))
    step = max(1.0, source_fps / fps)
    available = math.ceil(frames / step - 1e-9)
    return 0 if available < 1 else 1 + ratio * ((available - 1) // ratio)


def assign_bucket(record: dict, buckets: Sequence[Bucket], fps: float) -> Optional[Bucket]:
    """The clip's nearest bucket (see the module docstring), or None if it fits none."""
    frames = usable_frames(record, fps)
    height, width = int(record["height"]), int(record["width"])
    fitting = [b for b in buckets if b.frames <= frames]
    if frames > 1:
        videos = [b for b in fitting if b.frames > 1]
        fitting = videos or fitting
    if not fitting:
        return None
    aspect = math.log(width / height)
    pixels = math.log(width * height)
    return min(fitting, key=lambda b: (round(abs(aspect - math.log(b.width / b.height)), 9), -b.frames,
                                       abs(pixels - math.log(b.width * b.height)), b))


def group_by_bucket(records: Iterable[dict], buckets: Sequence[Bucket], fps: float) -> tuple[dict, list[dict]]:
    """{bucket: [records]} and the records that fit no bucket."""
    grouped: dict[Bucket, list[dict]] = {b: [] for b in buckets}
    unfit = []
    for record in records:
        bucket = assign_bucket(record, buckets, fps)
        (grouped[bucket] if bucket is not None else unfit).append(record)
    return grouped, unfit
