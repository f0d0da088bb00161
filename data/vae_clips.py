"""Training clips for the VAE: which clip, at which fps and from which time each global sample slot reads.

Everything is keyed on (seed, slot) with `derive_key` and computed, never drawn from a process's RNG, so a
run reads the same pixels at any data-parallel or context-parallel layout and after any resume:
* the clip: position slot mod n of epoch slot div n's keyed permutation of the usable clips;
* the fps: one of `vae_train.fps_choices` at which the clip fills `vae_train.frames` (a clip whose own rate is
  lower than the fps drawn is read at its own rate, `data.decode.frame_indices`);
* the start: a keyed frame of the clip from which the frames fit (`vae_train.random_start`), else its start.
A clip that fills the frame count at no fps (an image, a short video) is left out when the data is opened and
counted; one that fails to decode during training is skipped and counted, and the slot reads a keyed
replacement, so a corrupt file among millions never stops a run.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.decode import DecodeSpec, decode_clip, frame_indices
from cogvx_mega.data.manifest import MediaError, read_clip_lines
from cogvx_mega.data.order import KeyedPermutation, derive_key

logger = logging.getLogger(__name__)

REPLACEMENT_ATTEMPTS = 16


@dataclass(frozen=True)
class ClipDraw:
    """What one slot reads."""

    slot: int
    record: dict
    fps: float
    start: Optional[float]


class VAETrainingClips:
    """The usable clips of a manifest for `frames` x `size`^2 training at `fps_choices`."""

    def __init__(self, manifest: str, frames: int, size: int, fps_choices, temporal_compression_ratio: int,
                 seed: int, random_start: bool = True):
        self.frames, self.size, self.seed, self.random_start = frames, size, seed, random_start
        self.fps_choices = [float(f) for f in fps_choices]
        self.ratio = temporal_compression_ratio
        records = read_clip_lines(manifest, flag="--data")
        self.clips: list[tuple[dict, list[float]]] = []
        self.left_out = 0
        longest = 0
        for record in records:
            fits = [fps for fps in self.fps_choices if self._fills(record, fps)]
            if fits:
                self.clips.append((record, fits))
            else:
                self.left_out += 1
                longest = max(longest, self._count(record, min(self.fps_choices)))
        if not self.clips:
            raise ConfigError("--data", manifest, f"no clip fills vae_train.frames={frames} at any of the fps "
                                                  f"{self.fps_choices} (the longest gives {longest}); use fewer "
                                                  f"frames or longer clips")
        self.skipped = 0  # clips that failed to decode during this process's run

    def _count(self, record: dict, fps: float) -> int:
        if record.get("kind") == "image" or not record.get("fps") or not record.get("frames"):
            return 1 if record.get("kind") == "image" else 0
        spec = DecodeSpec(self.frames, self.size, self.size, fps, self.ratio)
        try:
            return len(frame_indices(float(record["fps"]), int(record["frames"]), spec, record.get("start"),
                                     record.get("end")))
        except MediaError:
            return 0

    def _fills(self, record: dict, fps: float) -> bool:
        return self._count(record, fps) >= self.frames

    def __len__(self) -> int:
        return len(self.clips)

    def draw(self, slot: int, attempt: int = 0) -> ClipDraw:
        n = len(self.clips)
        if attempt == 0:
            epoch, position = divmod(slot, n)
        else:  # a replacement for a clip that did not decode: another keyed clip
            epoch, position = -1 - attempt, derive_key(self.seed, "vae-replacement", slot, attempt) % n
        record, fits = self.clips[KeyedPermutation(n, derive_key(self.seed, "vae-order", epoch))(position)]
        fps = fits[derive_key(self.seed, "vae-fps", slot, attempt) % len(fits)]
        return ClipDraw(slot, record, fps, self._start(record, fps, slot, attempt))

    def _start(self, record: dict, fps: float, slot: int, attempt: int) -> Optional[float]:
        """A keyed start time from which `frames` frames at `fps` fit in the clip (None: the clip's own start)."""
        if not self.random_start:
            return record.get("start")
        source_fps = float(record["fps"])
        first = int(math.floor((record.get("start") or 0.0) * source_fps + 1e-9))
        last = int(record["frames"]) if record.get("end") is None else \
            min(int(record["frames"]), int(math.ceil(record["end"] * source_fps - 1e-9)))
        step = source_fps / fps if fps < source_fps else 1.0
        span = int(math.floor((self.frames - 1) * step + 1e-9)) + 1  # source frames the clip's frames cover
        room = last - first - span
        if room <= 0:
            return record.get("start")
        offset = first + derive_key(self.seed, "vae-start", slot, attempt) % (room + 1)
        return offset / source_fps

    def read(self, slot: int) -> tuple[torch.Tensor, ClipDraw]:
        """The slot's clip: float [3, frames, size, size] in [-1, 1]."""
        for attempt in range(REPLACEMENT_ATTEMPTS):
            draw = self.draw(slot, attempt)
            record = dict(draw.record, start=draw.start) if draw.start is not None else draw.record
            spec = DecodeSpec(self.frames, self.size, self.size, draw.fps, self.ratio)
            try:
                video = decode_clip(record, spec)
            except (MediaError, OSError) as error:
                self.skipped += 1
                logger.warning("skipping %s: %s", draw.record.get("path"), error)
                continue
            if video.shape[1] == self.frames:
                return video, draw
            self.skipped += 1
            logger.warning("skipping %s: it gave %d frames, not %d", draw.record.get("path"), video.shape[1],
                           self.frames)
        raise RuntimeError(f"{REPLACEMENT_ATTEMPTS} clips in a row failed to decode for sample slot {slot}; the data "
                           f"is mostly unreadable")
