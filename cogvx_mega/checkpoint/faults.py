"""Fault injection for the kill-and-resume tests: with `COGVX_FAULT_INJECT="POINT@STEP"` set, the process
(its whole process group: a checkpoint's background writer too) is SIGKILLed at that moment of that step.
Unset, every hook is one dictionary lookup.

Points: `step` (inside a training step, after the backward, before the update), `save` (a synchronous save:
while its shards are being written, or right after if the write was quicker than the watch), `async_write`
(an asynchronous save's background write under way), `rename` (the shards and the metadata written, the
checkpoint not yet renamed into place).

The interrupt tests send signals instead, at the `step` moment: `sigint`, `sigterm`, `sigusr1` (one signal to
the process itself, as a user's Ctrl-C or a scheduler would), `sigint2` (two Ctrl-C in a row).

The watchdog tests make a rank hang or lag: `hang` sleeps forever at the `step` moment (in `hang_here`, so the
frame shows in the stacks the hang watchdog dumps: a stand-in for a collective that never returns); `slow`
sleeps `COGVX_FAULT_INJECT_SLOW_S` seconds (default 0.5) at the start of every step's compute from STEP on
(`maybe_slow`: a straggler).

With `COGVX_FAULT_INJECT_RANK=R` only global rank R does it. With `COGVX_FAULT_INJECT_LOG=FILE` each fault
appends `POINT@STEP` to FILE as it fires. With `COGVX_FAULT_INJECT_ONCE=PATH` a fault fires only if PATH does not
exist, and creates it when it fires (a `slow` fault keeps firing in the process that created it): a requeued or
resumed job runs through the step that failed.
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
WATCHDOG_POINTS = ("hang", "slow")
SLOW_SECONDS = 0.5
"""How long a `slow` fault sleeps in each step unless COGVX_FAULT_INJECT_SLOW_S says."""

_claimed: set[str] = set()  # the ONCE files this process created


def _armed() -> Optional[tuple[str, int]]:
    spec = os.environ.get(ENVIRONMENT)
    if not spec:
        return None
    point, _, step = spec.partition("@")
    if point not in (*POINTS, *SIGNAL_POINTS, *WATCHDOG_POINTS) or not step.isdigit():
        raise ValueError(f"{ENVIRONMENT}={spec!r}: write POINT@STEP with POINT one of "
                         f"{', '.join((*POINTS, *SIGNAL_POINTS, *WATCHDOG_POINTS))}")
    rank = os.environ.get(ENVIRONMENT + "_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return None
    return point, int(step)


def _claim() -> bool:
    """Whether an armed fault may fire now: yes, unless COGVX_FAULT_INJECT_ONCE names a file that exists (the
    first fault to fire creates it, exclusively)."""
    path = os.environ.get(ENVIRONMENT + "_ONCE")
    if not path or path in _claimed:
        return True
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    _claimed.add(path)
    return True


def _note(point: str, step: int, detail: str = "") -> None:
    marker = os.environ.get(ENVIRONMENT + "_LOG")
    if marker:  # the test reads what was hit
        with open(marker, "a") as f:
            f.write(f"{point}@{step}{' ' + detail if detail else ''}\n")
            f.flush()
            os.fsync(f.fileno())


def kill_now(point: str, step: int, detail: str = "") -> None:
    _note(point, step, detail)
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def hang_here(step: int) -> None:
    """The `hang` fault: sleep forever inside step `step`, as a rank stuck in a collective would wait."""
    _note("hang", step)
    while True:
        time.sleep(1.0)


def maybe_kill(point: str, step: int, detail: str = "") -> None:
    armed = _armed()
    if armed is None:
        return
    if armed == (point, step):
        if _claim():
            kill_now(point, step, detail)
    elif point == "step" and armed[1] == step and armed[0] in SIGNAL_POINTS:
        if _claim():
            for number in SIGNAL_POINTS[armed[0]]:
                os.kill(os.getpid(), number)  # the handler runs at once, in this (the main) thread
    elif point == "step" and armed == ("hang", step) and _claim():
        hang_here(step)


def maybe_slow(step: int) -> None:
    """Armed for `slow@S`: sleep COGVX_FAULT_INJECT_SLOW_S seconds in every step from S on (a straggler)."""
    armed = _armed()
    if armed is not None and armed[0] == "slow" and step >= armed[1] and _claim():
        _note("slow", step)
        time.sleep(float(os.environ.get(ENVIRONMENT + "_SLOW_S", SLOW_SECONDS)))


def watch_save(folder: Path, step: int) -> None:
    """Armed for `save@step`: kill as soon as a shard file appears in `folder` (the write is under way)."""
    if _armed() != ("save", step) or not _claim():
        return

    def watch():
        while True:
            if folder.is_dir() and any(p.suffix == ".distcp" for p in folder.iterdir()):
                kill_now("save", step, "during-write")
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()
