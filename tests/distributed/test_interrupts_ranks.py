"""Interrupts and errors in a multi-rank job: a signal that reaches one rank stops every rank after the same step
with one checkpoint, and the resumed job equals one uninterrupted process; an error every rank raises is printed
once for the job, not once per rank."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from launcher import run_ranks

TINY = ["--preset", "tiny", "--data", "synthetic", "data.num_synthetic_clips=4", "training.micro_batch_size=1",
        "training.global_batch_size=2", "--device", "cpu"]  # one process accumulates what two ranks share


def train_rank(rank: int, world_size: int, args: list, fault: str = "") -> tuple[int, str]:
    """`cogvx train ARGS` on this rank (with COGVX_FAULT_INJECT=fault on rank 1 only); its status and stderr."""
    import os

    from cogvx_mega.cli import main

    if fault:
        os.environ.update(COGVX_FAULT_INJECT=fault, COGVX_FAULT_INJECT_RANK="1")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["train", *TINY, *args])
    return status, err.getvalue()


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


@pytest.mark.timeout(300)
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    from cogvx_mega.checkpoint.verify import verify_checkpoint
    from cogvx_mega.training.checkpoint import list_checkpoints, step_folder

    straight, run = tmp_path / "straight", tmp_path / "run"
    [(status, _)] = run_ranks(1, train_rank, ["--run-dir", str(straight), "--steps", "4"])
    assert status == 0
    # SIGTERM reaches rank 1 alone, inside the second step: both ranks finish it, save it and stop
    results = run_ranks(2, train_rank, ["--run-dir", str(run), "--steps", "4"], "sigterm@1")
    assert [status for status, _ in results] == [143, 143]
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]
    assert verify_checkpoint(step_folder(run, 2)).ok
    resumed = run_ranks(2, train_rank, ["--run-dir", str(run), "--steps", "4", "--resume", "auto"])
    assert [status for status, _ in resumed] == [0, 0]
    assert list(losses(run)) == [1, 2, 3, 4]
    assert losses(run) == pytest.approx(losses(straight), rel=1e-5)  # DP2 = one process, interrupted or not
    lines = [line for _, err in results for line in err.splitlines() if line.startswith("cogvx:")]
    assert len(lines) == 1 and "interrupted by SIGTERM at step 2" in lines[0]  # one line for the job


@pytest.mark.timeout(120)
def test_an_error_of_every_rank_is_printed_once(tmp_path):
    results = run_ranks(2, train_rank, ["--run-dir", str(tmp_path / "run"), "--steps", "2", "training.lr=-1"])
    assert [status for status, _ in results] == [2, 2]
    lines = [line for _, err in results for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cogvx: error: training.lr=")
