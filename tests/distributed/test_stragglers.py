"""The straggler report on two data-parallel ranks (`training.straggler_factor`): with rank 1 made slow inside its
steps (`COGVX_FAULT_INJECT=slow@1`), the logging rank names rank 1 and its node, never rank 0, and the metrics
rows carry `stragglers: [1]` with the compute times; the losses and gradient norms are those of the same job
without the report and without the slow rank."""
from __future__ import annotations

import contextlib
import io
import json
import socket
from pathlib import Path

import pytest

from launcher import run_ranks

TINY = ["--preset", "tiny", "--data", "synthetic", "data.num_synthetic_clips=4", "training.micro_batch_size=1",
        "--device", "cpu", "--steps", "4", "training.save_every_minutes=0", "training.log_interval=1"]
SLOW_S = 0.3


def train_rank(rank: int, world_size: int, args: list, slow: bool) -> tuple[int, str]:
    """`cogvx train ARGS` on this rank, rank 1 sleeping SLOW_S in each step from the second on when `slow`."""
    import os

    from cogvx_mega.cli import main

    if slow:
        os.environ.update(COGVX_FAULT_INJECT="slow@1", COGVX_FAULT_INJECT_RANK="1",
                          COGVX_FAULT_INJECT_SLOW_S=str(SLOW_S))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["train", *TINY, *args])
    return status, err.getvalue()


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(180)
def test_a_slow_rank_is_named_and_the_losses_do_not_change(tmp_path):
    reported, plain = tmp_path / "reported", tmp_path / "plain"
    results = run_ranks(2, train_rank, ["--run-dir", str(reported), "training.straggler_factor=2"], True)
    assert [status for status, _ in results] == [0, 0]
    named = [line for line in results[0][1].splitlines() if line.startswith("straggler: ")]
    assert len(named) == 3, results[0][1]  # steps 2, 3 and 4
    for line in named:
        assert line.startswith(f"straggler: rank 1 (node {socket.gethostname()}) ") and "rank 0" not in line
        assert line.endswith("x, training.straggler_factor=2)") and "s/step of compute against the median" in line
    assert not [line for line in results[1][1].splitlines() if line.startswith("straggler: ")]  # the logging rank's
    found = rows(reported)
    assert 0 not in found[0]["stragglers"]
    assert [row["stragglers"] for row in found[1:]] == [[1], [1], [1]]
    assert all(row["compute_time_max"] >= SLOW_S > row["compute_time_median"] for row in found[1:])

    assert [status for status, _ in run_ranks(2, train_rank, ["--run-dir", str(plain)], False)] == [0, 0]
    without = rows(plain)
    assert "stragglers" not in without[0]
    assert [(r["loss"], r["grad_norm"]) for r in found] == [(r["loss"], r["grad_norm"]) for r in without]
