"""Buckets: each clip to its nearest bucket by what it can fill, aspect ratio, duration and resolution."""
from __future__ import annotations

import pytest

from cogvx_mega.config import ConfigError
from cogvx_mega.data.buckets import Bucket, assign_bucket, group_by_bucket, usable_frames

BUCKETS = [Bucket.parse(b) for b in ("49x480x720", "49x720x480", "25x480x720", "1x480x720", "1x720x480",
                                     "49x256x256")]


def clip(frames, fps, height, width, kind="video", **extra):
    return {"kind": kind, "frames": frames, "fps": fps, "height": height, "width": width, **extra}


@pytest.mark.parametrize("record, expected", [
    (clip(200, 24, 1080, 1920), "49x480x720"),         # long landscape
    (clip(200, 24, 1920, 1080), "49x720x480"),         # long portrait
    (clip(100, 24, 1080, 1920), "25x480x720"),         # 34 frames at 8 fps: the 25-frame bucket
    (clip(200, 30, 500, 500), "49x256x256"),           # square
    (clip(1, None, 600, 900, kind="image"), "1x480x720"),
    (clip(1, None, 900, 600, kind="image"), "1x720x480"),
    (clip(6, 24, 480, 720), "1x480x720"),              # too short for any video bucket: a still
])
def test_each_clip_goes_to_its_nearest_bucket(record, expected):
    assert assign_bucket(record, BUCKETS, fps=8).name == expected


def test_usable_frames_and_unfit_clips():
    assert usable_frames(clip(200, 24, 10, 10), fps=8) == 65  # 67 frames at 8 fps, cut to 1 + 4k
    assert usable_frames(clip(200, 24, 10, 10, start=1.0, end=4.0), fps=8) == 21
    assert usable_frames(clip(1, None, 10, 10, kind="image"), fps=8) == 1
    grouped, unfit = group_by_bucket([clip(30, 24, 480, 720), clip(200, 24, 480, 720)],
                                     [Bucket.parse("49x480x720")], fps=8)
    assert len(grouped[Bucket.parse("49x480x720")]) == 1 and len(unfit) == 1  # 10 frames fill no 49-frame bucket


@pytest.mark.parametrize("text", ["48x480x720", "49x480", "abc"])
def test_bad_bucket_is_a_clear_error(text):
    with pytest.raises(ConfigError, match="data.buckets"):
        Bucket.parse(text)
