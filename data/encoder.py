"""Clips into what the latent cache holds: frames decoded in background threads ahead of use, the VAE's
posterior moments (mean, log-variance) and the captions' T5 embeddings. One encoder for both users:
`cogvx data encode` (`cache.py`) writes its output to the zarr store, online training (`online.py`) feeds it
to the step that asked, so both see the same numbers for the same clip.

Decoding runs in `workers` threads (`data.num_workers`): PyAV, DALI and the resize release the GIL, so the
threads overlap with each other and with the VAE running in the caller's thread. `decode_ahead` starts the
decodes of clips needed later (the next shard, the next step) and returns their futures; `encode` waits for
them in order. With no workers a clip is decoded when `encode` reaches it.

A fork (megatron's checkpoint writer forks its writer processes) waits for the decodes running at that
moment to finish and starts no new one until it is done: a thread inside the decoder or a torch kernel at
the moment of the fork leaves locks held in the child, which then hangs.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from cogvx_mega.diffusion.image_condition import first_frame_pixels
from cogvx_mega.data.buckets import Bucket
from cogvx_mega.data.decode import DecodeSpec, decode_clip
from cogvx_mega.data.manifest import MediaError

logger = logging.getLogger(__name__)


@dataclass
class EncodedClips:
    moments: list[Optional[tuple[np.ndarray, np.ndarray]]]
    """Per clip: (mean, logvar) float32 [C, T', H/8, W/8], or None when it could not be decoded."""
    text: np.ndarray
    """[n, L, D] float32 T5 embeddings of the captions (also for the clips that failed)."""
    failures: list[Optional[str]]
    """Per clip: why it could not be used, or None."""
    first_frames: list[Optional[np.ndarray]]
    """Per clip: its first frame, uint8 [3, H, W] (the image of image-to-video training), or None."""


class _DecodeLater:
    """A future-like decode that runs when its result is asked for (no worker threads)."""

    def __init__(self, function, *args):
        self._function, self._args = function, args

    def result(self):
        return self._function(*self._args)


class _ForkGate:
    """Lets decodes run, except across a fork: `before_fork` waits until none runs and holds new ones back,
    `after_fork` lets them go again (in the parent, and in the child, where the gate is a copy)."""

    _open_gates: "weakref.WeakSet[_ForkGate]" = weakref.WeakSet()
    _registered = False

    def __init__(self):
        self._condition = threading.Condition()
        self._running, self._forking = 0, False
        if not _ForkGate._registered:
            os.register_at_fork(before=_ForkGate._close_all, after_in_parent=_ForkGate._open_all,
                                after_in_child=_ForkGate._reset_all)
            _ForkGate._registered = True
        _ForkGate._open_gates.add(self)

    def run(self, function, *args):
        with self._condition:
            self._condition.wait_for(lambda: not self._forking)
            self._running += 1
        try:
            return function(*args)
        finally:
            with self._condition:
                self._running -= 1
                self._condition.notify_all()

    @classmethod
    def _close_all(cls) -> None:
        for gate in list(cls._open_gates):
            with gate._condition:
                gate._forking = True
                gate._condition.wait_for(lambda: gate._running == 0)

    @classmethod
    def _open_all(cls) -> None:
        for gate in list(cls._open_gates):
            with gate._condition:
                gate._forking = False
                gate._condition.notify_all()

    @classmethod
    def _reset_all(cls) -> None:  # the child has no decode threads; its copies of the gates start fresh
        for gate in list(cls._open_gates):
            gate._condition = threading.Condition()
            gate._running, gate._forking = 0, False


class ClipEncoder:
    """`encode(records, bucket)` -> EncodedClips, for clips of one bucket. `device`: where the VAE and T5
    run and, for DALI's GPU decoder, where frames are decoded (a CUDA device given as 'cuda:N')."""

    def __init__(self, vae, text_encoder, fps: float, device: str = "cpu", workers: int = 0):
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"  # worker threads start on device 0 otherwise
        self.vae, self.text_encoder, self.fps, self.device = vae, text_encoder, fps, device
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cogvx-decode") if workers > 0 else None
        self._gate = _ForkGate() if workers > 0 else None

    def spec(self, bucket: Bucket) -> DecodeSpec:
        return DecodeSpec(frames=bucket.frames, height=bucket.height, width=bucket.width, fps=self.fps)

    def _decode(self, record: dict, bucket: Bucket) -> torch.Tensor:
        video = decode_clip(record, self.spec(bucket), device=self.device)
        if video.shape[1] != bucket.frames:
            raise MediaError(f"gives {video.shape[1]} frames, not the bucket's {bucket.frames}")
        return video

    def decode_ahead(self, records: Sequence[dict], bucket: Bucket) -> list:
        """Start decoding these clips (in the worker threads); the futures go to `encode` in the same order."""
        if self._pool is None:
            return [_DecodeLater(self._decode, record, bucket) for record in records]
        return [self._pool.submit(self._gate.run, self._decode, record, bucket) for record in records]

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        mean, logvar = self.vae.encode_moments(video[None].to(self.device))
        return mean[0].float().cpu().numpy(), logvar[0].float().cpu().numpy()

    def encode_text(self, captions: Sequence[str]) -> np.ndarray:
        return self.text_encoder.encode(list(captions)).numpy()

    def encode(self, records: Sequence[dict], bucket: Bucket, decoded: Optional[list] = None) -> EncodedClips:
        """The clips' moments and caption embeddings; `decoded`: their futures from `decode_ahead` (else they
        are decoded now). A clip that cannot be decoded (MediaError, OSError) gets None and its reason."""
        decoded = decoded if decoded is not None else self.decode_ahead(records, bucket)
        moments, failures, first_frames = [], [], []
        for record, pending in zip(records, decoded):
            try:
                video = pending.result()
                moments.append(self.encode_video(video))
                first_frames.append(first_frame_pixels(video).cpu().numpy())
                failures.append(None)
            except (MediaError, OSError) as error:
                moments.append(None)
                first_frames.append(None)
                failures.append(str(error))
        return EncodedClips(moments, self.encode_text([record["caption"] for record in records]), failures,
                            first_frames)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "ClipEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cancel(pending: Sequence) -> None:
    """Drop decodes that are no longer wanted (a future already running finishes; its result is unused)."""
    for item in pending:
        if isinstance(item, Future):
            item.cancel()
