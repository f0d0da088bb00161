"""Fault injection for the kill-and-resume tests: with `COGVX_FAULT_INJECT="POINT@STEP"` set, the process
(its whole process group: a checkpoint's background writer too) is SIGKILLed at that moment of that step.
Unset, every hook is one dictionary lookup.

Points: `step` (inside a training step, after the backward, before the update), `save` (a synchronous save:
while its shards are being written, or right after if the write was quicker than the watch), `async_write`
(an asynchronous save's background write under way), `rename` (the shards and the metadata written, the
checkpoint not yet renamed into place).

The interrupt tests send signals instead, at the `step` moment: `sigint`, `sigterm`, `sigusr1` (one signal to
the process itself, as a user's Ctrl-C or a scheduler would), `sigint2` (two Ctrl-C in a row). With
`COGVX_FAULT_INJECT_RANK=R` only global rank R does it.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

ENVIRONMENT = "COGVX_FAULT_INJECT"
POINTS = ("step", "save", "async_write", "rename")
SIGNAL_POINTS = {"sigint": [signal.SIGINT], "sigterm": [signal.SIGTERM], "sigusr1": [signal.SIGUSR1],
                 "sigint2": [signal.SIGINT, signal.SIGINT]}


def _armed() -> Optional[tuple[str, int]]:
    spec = os.environ.get(ENVIRONMENT)
    if not spec:
        return None
    point, _, step = spec.partition("@")
    if point not in (*POINTS, *SIGNAL_POINTS) or not step.isdigit():
        raise ValueError(f"{ENVIRONMENT}={spec!r}: write POINT@STEP with POINT one of "
                         f"{', '.join((*POINTS, *SIGNAL_POINTS))}")
    rank = os.environ.get(ENVIRONMENT + "_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return None
    return point, int(step)


def kill_now(point: str, step: int, detail: str = "") -> None:
    marker = os.environ.get(ENVIRONMENT + "_LOG")
    if marker:  # the test reads what was hit
        with open(marker, "a") as f:
            f.write(f"{point}@{step}{' ' + detail if detail else ''}\n")
            f.flush()
            os.fsync(f.fileno())
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill(point: str, step: int, detail: str = "") -> None:
    armed = _armed()
    if armed == (point, step):
        kill_now(point, step, detail)
    elif point == "step" and armed is not None and armed[1] == step and armed[0] in SIGNAL_POINTS:
        for number in SIGNAL_POINTS[armed[0]]:
            os.kill(os.getpid(), number)  # the handler runs at once, in this (the main) thread


def watch_save(folder: Path, step: int) -> None:
    """Armed for `save@step`: kill as soon as a shard file appears in `folder` (the write is under way)."""
    if _armed() != ("save", step):
        return

    def watch():
        while True:
            if folder.is_dir() and any(p.suffix == ".distcp" for p in folder.iterdir()):
                kill_now("save", step, "during-write")
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()
