"""A hang watchdog (`training.hang_timeout_s`): a daemon thread per rank that ends the process when the training
loop makes no progress for that long, so a job stuck in a collective or a deadlock fails (and the launcher
requeues it) instead of holding its nodes until the time limit.

The loop `beat(step)`s at every step boundary; work that is legitimately long (checkpoint saves and their
completion, validation, sampling) runs inside `with watchdog.paused():`, which restarts the clock when the block
starts and when it ends (pauses nest) and allows the block `PAUSED_TIMEOUT_FACTOR` x the timeout: a save stuck
in a collective is a hang too, found later. The first step after a start is allowed the same factor: it makes the
NCCL communicators, compiles and autotunes kernels, and on a loaded machine it is the slowest by far (as
nvidia-resiliency-ext's initial heartbeat timeout, longer than the steady one); later steps get the timeout itself,
which must exceed the slowest step. When it fires, the thread:

1. writes one line to stderr (the job's log under SLURM) naming the rank, its node, the last finished step and
   the wait, e.g. `cogvx: rank 3 (node cxn1): no training progress for 20.0 s after step 3
   (training.hang_timeout_s=20): stacks of every thread follow, then exit 75`;
2. dumps the stack of every thread there (`faulthandler`, which reads them without the GIL's cooperation: it
   works while the main thread is blocked in C, in a sleep or a gloo/NCCL wait);
3. writes the same to `<run_dir>/hangs/step<N>-rank<R>.txt` (best effort, given a few seconds: a hung
   filesystem does not keep the process alive);
4. kills the process's multiprocessing children (a checkpoint writer, data workers, the CPU checkpoint queue's
   manager: they would outlive it, holding the job's log open) and ends the process with
   `os._exit(HANG_EXIT_CODE)` (75, EX_TEMPFAIL: a failure worth a retry), which needs no cooperation from the
   main thread either.

Generic on purpose (a timeout, a rank, a label, a run dir): the VAE trainer can run one the same way.
"""
from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

HANG_EXIT_CODE = 75
"""The exit status of a rank the watchdog ended (EX_TEMPFAIL of sysexits.h: temporary, try again)."""
HANGS_FOLDER = "hangs"
PAUSED_TIMEOUT_FACTOR = 10
"""A paused block (a save, validation, sampling), and the first step after a start, may take this many times the
timeout before it counts as a hang."""
FILE_WRITE_SECONDS = 10.0
"""How long the stack file may take before the process exits without it."""


def node_name() -> str:
    """The node this process runs on: SLURM's name for it (SLURMD_NODENAME), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class HangWatchdog:
    """Ends this process when `beat` has not been called for `timeout_s` seconds outside `paused()` blocks
    (see the module). `timeout_s` None or 0: off (every method is a no-op)."""

    def __init__(self, timeout_s: Optional[float], rank: int, label: str = "training",
                 run_dir: Optional[str | os.PathLike] = None, setting: str = "training.hang_timeout_s"):
        self.timeout_s = float(timeout_s) if timeout_s else 0.0
        self.rank = rank
        self.label = label
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.setting = setting
        self.interval_s = min(1.0, self.timeout_s / 10)
        self._last = (time.monotonic(), 0)  # (when, the last finished step): replaced whole, read whole
        self._pauses = 0
        self._first_step = True  # until the first beat after start: the long limit
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self, step: int = 0) -> "HangWatchdog":
        """Start watching, with `step` the last finished step (the one training starts after)."""
        if self.enabled and self._thread is None:
            self.beat(step)
            self._first_step = True
            self._stopping.clear()
            self._thread = threading.Thread(target=self._watch, name=f"cogvx-hang-watchdog-rank{self.rank}",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (the thread ends within one check interval; joined here)."""
        if self._thread is not None:
            self._stopping.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "HangWatchdog":
        return self.start(self._last[1])

    def __exit__(self, *exc) -> None:
        self.stop()

    def beat(self, step: int) -> None:
        """Progress: `step` is finished; the clock starts again."""
        self._last = (time.monotonic(), step)
        self._first_step = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A block that may legitimately take long (a save, validation, sampling): the clock starts again from zero
        when it starts and after it, and the block may take PAUSED_TIMEOUT_FACTOR x the timeout. The clock is reset
        before the count changes, so the thread never sees an old time with the short limit."""
        if self._pauses == 0:
            self._last = (time.monotonic(), self._last[1])
        self._pauses += 1
        try:
            yield
        finally:
            self._last = (time.monotonic(), self._last[1])
            self._pauses -= 1

    # --- the thread ------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stopping.wait(self.interval_s):
            when, step = self._last
            waited = time.monotonic() - when
            paused, first = self._pauses > 0, self._first_step
            if waited >= self.timeout_s * (PAUSED_TIMEOUT_FACTOR if paused or first else 1):
                self._fire(step, waited, paused=paused, first=first and not paused)

    def header(self, step: int, waited: float, paused: bool = False, first: bool = False) -> str:
        where = (f" inside a save, validation or sampling (allowed {PAUSED_TIMEOUT_FACTOR} x the timeout)"
                 if paused else
                 f" in the first step after the start (allowed {PAUSED_TIMEOUT_FACTOR} x the timeout)"
                 if first else "")
        return (f"cogvx: rank {self.rank} (node {node_name()}): no {self.label} progress for {waited:.1f} s after "
                f"step {step}{where} ({self.setting}={self.timeout_s:g}): stacks of every thread follow, then exit "
                f"{HANG_EXIT_CODE}")

    def _fire(self, step: int, waited: float, paused: bool = False, first: bool = False) -> None:
        header = self.header(step, waited, paused, first)
        try:
            stream = _stderr_with_descriptor()
            stream.write(header + "\n")
            stream.flush()
            faulthandler.dump_traceback(file=stream, all_threads=True)
            stream.flush()
            if self.run_dir is not None:
                writer = threading.Thread(target=self._write_file, args=(step, header), daemon=True)
                writer.start()
                writer.join(FILE_WRITE_SECONDS)
        finally:
            _end_children()
            os._exit(HANG_EXIT_CODE)

    def _write_file(self, step: int, header: str) -> None:
        """`<run_dir>/hangs/step<N>-rank<R>.txt`: the header and every thread's stack (best effort)."""
        try:
            folder = self.run_dir / HANGS_FOLDER
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"step{step}-rank{self.rank}.txt", "w") as file:  # faulthandler needs a real file
                file.write(header + "\n")
                file.flush()
                faulthandler.dump_traceback(file=file, all_threads=True)
                file.flush()
                os.fsync(file.fileno())
        except Exception as error:  # the process ends anyway: say why the file is missing
            with contextlib.suppress(Exception):
                stream = _stderr_with_descriptor()
                stream.write(f"cogvx: rank {self.rank}: could not write the stacks under {self.run_dir}: {error}\n")
                stream.flush()


def _end_children() -> None:
    """SIGKILL this process's multiprocessing children (os._exit skips the shutdown that would end them)."""
    with contextlib.suppress(Exception):
        for child in multiprocessing.active_children():
            with contextlib.suppress(Exception):
                child.kill()


def _stderr_with_descriptor():
    """sys.stderr if it is a real file (faulthandler writes to its descriptor), else the process's own stderr
    (a test or a notebook may have replaced sys.stderr with an in-memory stream)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__
