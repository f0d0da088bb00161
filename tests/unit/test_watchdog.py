"""The hang watchdog (`training.hang_timeout_s`) and the faults that exercise it: a process whose main thread is
blocked without beating ends with exit status 75, one header line naming the rank, its node, its last step and
the wait, and every thread's stack, on stderr and in <run_dir>/hangs/; beats and pauses keep it quiet and `stop`
ends its thread; a pause stuck past 10 x the timeout fires too. The `slow` fault and the straggler report on one
process. A training run's hang (the `hang` fault on one rank of a 2-node job, requeued and resumed to the
one-process losses) is tests/distributed/test_slurm_multinode.py."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from cogvx_mega.training.watchdog import HANG_EXIT_CODE, HangWatchdog


def python(snippet: str, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(snippet), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=environment)


@pytest.mark.timeout(60)
def test_a_rank_blocked_without_progress_is_ended_with_its_stacks(tmp_path):
    done = python("""
        import sys, time
        from cogvx_mega.training.watchdog import HangWatchdog

        def blocked_in_a_long_call():
            time.sleep(60)  # the main thread in C, as in a collective that never returns

        HangWatchdog(1.0, rank=3, run_dir=sys.argv[1]).start(step=6).beat(7)  # past the first step's allowance
        blocked_in_a_long_call()
        """, tmp_path / "run", env={"SLURMD_NODENAME": "cxn1"})
    assert done.returncode == HANG_EXIT_CODE == 75, done.stderr
    lines = done.stderr.splitlines()
    header = lines[0]
    assert header.startswith("cogvx: rank 3 (node cxn1): no training progress for 1.")
    assert header.endswith(" s after step 7 (training.hang_timeout_s=1): stacks of every thread follow, then exit 75")
    assert float(header.split(" for ")[1].split(" s ")[0]) < 3  # checked at least every 0.1 s
    assert any("in blocked_in_a_long_call" in line for line in lines), done.stderr  # the main thread's frame
    assert any("cogvx-hang-watchdog" in line or "in _watch" in line for line in lines)  # and the watchdog's
    saved = (tmp_path / "run" / "hangs" / "step7-rank3.txt").read_text()
    assert saved.splitlines()[0] == header and "in blocked_in_a_long_call" in saved


@pytest.mark.timeout(60)
def test_beats_and_pauses_keep_it_quiet_and_stop_ends_its_thread(tmp_path):
    done = python("""
        import threading, time
        from cogvx_mega.training.watchdog import HangWatchdog

        watchdog = HangWatchdog(0.4, rank=0).start()
        for step in range(1, 9):  # steps of 0.1 s for twice the timeout
            time.sleep(0.1)
            watchdog.beat(step)
        with watchdog.paused():  # a save 2.5 times the timeout
            with watchdog.paused():
                time.sleep(1.0)
        time.sleep(0.25)  # the clock starts again from the pause's end
        watchdog.stop()
        assert [t for t in threading.enumerate() if t.name.startswith("cogvx-hang-watchdog")] == []
        time.sleep(0.6)  # stopped: no longer watching
        print("finished")
        """)
    assert done.returncode == 0 and done.stdout.strip() == "finished", done.stderr
    assert "no training progress" not in done.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["pause", "first-step"])
def test_a_pause_or_a_first_step_stuck_past_ten_times_the_timeout_is_a_hang_too(where):
    done = python(f"""
        import time
        from cogvx_mega.training.watchdog import HangWatchdog

        def stuck():
            time.sleep(60)

        watchdog = HangWatchdog(0.2, rank=1).start(step=4)
        if "{where}" == "pause":
            watchdog.beat(5)
            with watchdog.paused():  # a save
                stuck()
        time.sleep(1.0)  # the first step after the start: 5 x the timeout is still quiet
        stuck()
        """)
    assert done.returncode == HANG_EXIT_CODE, done.stderr
    header = done.stderr.splitlines()[0]
    inside = ("after step 5 inside a save, validation or sampling" if where == "pause"
              else "after step 4 in the first step after the start")
    assert f" {inside} (allowed 10 x the timeout) " in header
    assert 2.0 <= float(header.split(" for ")[1].split(" s ")[0]) < 4  # 10 x 0.2 s, checked every 0.02 s
    assert "in stuck" in done.stderr


def test_off_it_starts_no_thread():
    for timeout in (None, 0):
        watchdog = HangWatchdog(timeout, rank=0).start()
        assert not watchdog.enabled and watchdog._thread is None
        with watchdog.paused():
            watchdog.beat(1)
        watchdog.stop()


def test_the_slow_fault_and_the_once_marker(tmp_path, monkeypatch):
    import time

    from cogvx_mega.checkpoint import faults

    monkeypatch.setenv("COGVX_FAULT_INJECT", "slow@2")
    monkeypatch.setenv("COGVX_FAULT_INJECT_SLOW_S", "0.05")
    monkeypatch.setenv("COGVX_FAULT_INJECT_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("COGVX_FAULT_INJECT_ONCE", str(tmp_path / "once"))
    monkeypatch.delenv("COGVX_FAULT_INJECT_RANK", raising=False)
    monkeypatch.setattr(faults, "_claimed", set())
    took = []
    for step in range(4):
        started = time.perf_counter()
        faults.maybe_slow(step)
        faults.maybe_kill("step", step)  # a slow fault never kills
        took.append(time.perf_counter() - started)
    assert [t >= 0.05 for t in took] == [False, False, True, True]  # from step 2 on, in the process that fired
    assert (tmp_path / "log").read_text().split() == ["slow@2", "slow@3"]
    monkeypatch.setattr(faults, "_claimed", set())  # a new process (a requeued job): the marker exists
    started = time.perf_counter()
    faults.maybe_slow(3)
    assert time.perf_counter() - started < 0.05


def test_the_straggler_report_of_one_process(tmp_path):
    import torch

    from cogvx_mega.training.stragglers import StragglerReport

    report = StragglerReport(2.0, torch.device("cpu"), is_logging_rank=True)
    wrapped = report.timer.wrap(lambda *args, **kwargs: "finalized")
    for _ in range(2):
        report.timer.step_started()
        assert wrapped([], None) == "finalized"
        wrapped([], None)  # a second call in the step does not move the mark
        report.timer.step_finished()
    fields = report.report()
    assert fields["stragglers"] == [] and fields["compute_time_median"] == fields["compute_time_max"] > 0
    assert report.timer.steps == 0  # a new interval
