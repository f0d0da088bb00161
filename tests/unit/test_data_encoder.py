"""The clip encoder's background decoding: results come back in order and match decoding in the calling
thread, and a fork (megatron's checkpoint writers fork) waits for running decodes and starts none."""
from __future__ import annotations

import os
import threading
import time

import torch

from cogvx_mega.data.buckets import Bucket
from cogvx_mega.data.encoder import ClipEncoder


class SlowDecodes(ClipEncoder):
    """Decodes that take a while and say when they ran."""

    def __init__(self, workers: int):
        super().__init__(vae=None, text_encoder=None, fps=8.0, workers=workers)
        self.started, self.spans = threading.Event(), []

    def _decode(self, record, bucket):
        begin = time.monotonic()
        self.started.set()
        time.sleep(0.3)
        self.spans.append((begin, time.monotonic()))
        return torch.full((3, bucket.frames, 2, 2), float(record["value"]))


def test_background_decodes_come_back_in_order():
    bucket = Bucket(5, 8, 8)
    records = [{"value": v} for v in range(5)]
    with SlowDecodes(workers=3) as threaded, SlowDecodes(workers=0) as inline:
        ahead = threaded.decode_ahead(records, bucket)
        values = [future.result()[0, 0, 0, 0].item() for future in ahead]
        assert values == [r["value"] for r in records]
        assert [p.result()[0, 0, 0, 0].item() for p in inline.decode_ahead(records, bucket)] == values
        starts = sorted(begin for begin, _ in threaded.spans)
        assert starts[2] - starts[0] < 0.3  # three at once, not one after another


def test_a_fork_waits_for_running_decodes_and_starts_none():
    bucket = Bucket(1, 8, 8)
    with SlowDecodes(workers=2) as encoder:
        futures = encoder.decode_ahead([{"value": v} for v in range(4)], bucket)
        encoder.started.wait(5)
        pid = os.fork()
        if pid == 0:
            os._exit(0)  # the child only has to exist
        forked_at = time.monotonic()
        os.waitpid(pid, 0)
        for future in futures:
            future.result()
        running_at_fork = [(a, b) for a, b in encoder.spans if a < forked_at]
        assert running_at_fork and all(end <= forked_at for _, end in running_at_fork)
        assert any(begin >= forked_at for begin, _ in encoder.spans)  # the rest started after the fork
