"""Signals that end a training run cleanly: SIGINT (Ctrl-C), SIGTERM (a scheduler's or `kill`'s stop) and SIGUSR1
(SLURM's `--signal=USR1@S` when it reaches the training processes).

While training, `catch_interrupts()` replaces their handlers with one that only notes the signal; the loop looks
at the note at every step boundary (every rank, through the step's stop vote, `Trainer._stop_vote`), saves a
checkpoint of the finished step and raises `TrainingInterrupted`, which `cogvx train` turns into one line and
exit status 128 + the signal's number (the shell's convention: 130 for Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1).
A second Ctrl-C goes to the operating system's default action, which ends the process at once, even inside a
collective (the checkpoint in flight is left as an incomplete folder that the next `--resume auto` removes).

Under torchrun the workers run in their own sessions: a Ctrl-C in the terminal reaches torchrun, which forwards
it to every worker and kills them after its `--shutdown-timeout` (30 s by default; give it more than a
checkpoint save takes). The handlers are only installed from the main thread; elsewhere (a notebook's worker
thread, a test's thread) the run keeps the process's handlers.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint of the last finished step."""

    def __init__(self, signal_number: int, step: int, checkpoint):
        self.signal_number = signal_number
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signal_number).name
        super().__init__(f"interrupted by {name} at step {step}: checkpoint saved at {checkpoint}; continue with "
                         f"--resume auto")

    @property
    def exit_status(self) -> int:
        return 128 + self.signal_number


class InterruptNote:
    """The first handled signal received (its number), or 0."""

    def __init__(self):
        self.signal_number = 0

    def _on_signal(self, number, frame) -> None:
        if not self.signal_number:
            self.signal_number = number
        if number == signal.SIGINT:  # the next Ctrl-C ends the process at once
            signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def catch_interrupts() -> Iterator[InterruptNote]:
    """Note SIGINT, SIGTERM and SIGUSR1 instead of acting on them, for the duration of the block (main thread
    only; the previous handlers are restored after)."""
    note = InterruptNote()
    if threading.current_thread() is not threading.main_thread():
        yield note
        return
    previous: dict[int, Optional[object]] = {}
    try:
        for number in HANDLED_SIGNALS:
            previous[number] = signal.signal(number, note._on_signal)
        yield note
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
