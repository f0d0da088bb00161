"""Resolution and duration buckets: every clip goes to its nearest bucket, every batch comes from one.

A bucket is `FRAMESxHEIGHTxWIDTH` in pixels (frames 1 + 4k), e.g. 49x480x720 (landscape), 49x720x480
(portrait), 1x480x720 (images). A clip goes to the bucket that keeps the most of it:
1. only buckets it can fill: at the target frame rate it has at least the bucket's frames (images and
   1-frame buckets always fit each other; a video never goes to a 1-frame bucket while a video bucket fits);
2. of those, the nearest aspect ratio (|log(w/h) - log(W/H)|: cropping loses the least);
3. then the longest duration, then the resolution closest to the clip's own (log of the pixel count).
Clips that fit no bucket are skipped and counted by the caller. A bucket holding fewer clips than the global batch
is never drawn; `merge_small_buckets` (data.small_buckets=merge) moves its clips to the nearest bucket that fills
one, `small_buckets` names it for the warning of data.small_buckets=drop (`accounting.py`).
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

    def latent_grid(self, temporal: int = 4, spatial: int = 8) -> tuple[int, int, int]:
        """(T', H', W') of the bucket's clips after the VAE's compression."""
        return (self.frames - 1) // temporal + 1, self.height // spatial, self.width // spatial

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
    return bucket_for(usable_frames(record, fps), int(record["height"]), int(record["width"]), buckets)


def bucket_for(frames: int, height: int, width: int, buckets: Sequence[Bucket]) -> Optional[Bucket]:
    """The nearest bucket of a clip that gives `frames` usable frames at height x width, or None. (The clip index
    calls it once per distinct (frames, height, width) of a corpus, `index.py`.)"""
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


def small_buckets(clips: dict[str, int], global_batch: int) -> dict[str, int]:
    """The buckets that hold some clips but fewer than `global_batch`: every global batch comes from one bucket,
    so no step ever draws them (with data.small_buckets=drop their clips are never trained on)."""
    return {name: count for name, count in clips.items() if 0 < count < global_batch}


def merge_small_buckets(grouped: dict[Bucket, list[dict]], fps: float,
                        global_batch: int) -> tuple[dict[Bucket, list[dict]], dict[str, dict[str, int]]]:
    """`data.small_buckets=merge`: the clips of every bucket that holds fewer than `global_batch` clips moved to
    the nearest bucket that fills a global batch; returns the new grouping and {small bucket: {bucket: clips
    moved there}}.

    "Nearest" is decided clip by clip with the very rules that put a clip in a bucket in the first place
    (`assign_bucket`), among the buckets holding at least `global_batch` clips of their own: only buckets the
    clip has the frames for (so a video is never stretched in time and an image never goes to a video bucket),
    then the nearest aspect ratio (the least cropped away), then the longest duration, then the resolution
    closest to the clip's own. The moved clips are decoded at the new bucket's size (resized keeping the aspect
    ratio to cover it, centre-cropped) like every clip of that bucket, and come after its own clips, in
    manifest order. A clip no such bucket can take stays in its small bucket (and is reported as not trained
    on); a small bucket never receives clips, so merging is one pass and its result does not depend on order."""
    counts = {bucket: len(items) for bucket, items in grouped.items()}
    out = {bucket: list(items) for bucket, items in grouped.items()}
    moves = merge_targets(counts, {b: items for b, items in grouped.items() if 0 < len(items) < global_batch},
                          fps, global_batch)
    moved: dict[str, dict[str, int]] = {}
    for bucket, pairs in moves.items():
        out[bucket] = [record for record, target in pairs if target is None]
        for record, target in pairs:
            if target is not None:
                out[target].append(record)
                into = moved.setdefault(bucket.name, {})
                into[target.name] = into.get(target.name, 0) + 1
    return out, moved


def merge_targets(counts: dict[Bucket, int], small: dict[Bucket, list[dict]], fps: float,
                  global_batch: int) -> dict[Bucket, list[tuple[dict, Optional[Bucket]]]]:
    """For each small bucket (in the order of `counts`), its records (in their order) paired with the bucket each
    moves to, or None where it stays: the rule of `merge_small_buckets`, from the clip counts of all buckets and
    the records of the small ones only (what the clip index holds in memory while it merges)."""
    targets = [bucket for bucket, count in counts.items() if count >= global_batch]
    return {bucket: [(record, assign_bucket(record, targets, fps) if targets else None) for record in small[bucket]]
            for bucket in counts if bucket in small}
