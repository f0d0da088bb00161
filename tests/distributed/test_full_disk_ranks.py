"""A full disk in a two-rank job: the checkpoint does not fit, synchronous or in the background, and both ranks
exit 1 with one line for the job that names the checkpoint (rank 1 learns of the full disk from rank 0, which
holds every rank's failures), no traceback, and no hidden folder left. The ranks run on a small tmpfs in a
private mount namespace (root only; skipped elsewhere)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from small_disk import on_small_disk, python, skip_without_small_disks

# the ranks forked from a fresh interpreter that runs in the namespace (`launcher.run_ranks`)
TWO_RANKS = r"""
import contextlib, io, json, sys
sys.path[:0] = [sys.argv[1]]
from launcher import run_ranks

def train_rank(rank, world_size, args):
    from cogvx_mega.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["train", *args])
    return status, err.getvalue()

print(json.dumps(run_ranks(2, train_rank, sys.argv[2:], timeout=200)))
"""
TINY = ["--preset", "tiny", "--data", "synthetic", "data.num_synthetic_clips=4", "training.micro_batch_size=1",
        "training.global_batch_size=2", "--device", "cpu"]


@pytest.mark.timeout(280)
@pytest.mark.parametrize("save", ["training.async_save=false", "training.async_save=true"])
def test_a_checkpoint_that_does_not_fit_is_one_line_for_the_job(tmp_path, save):
    skip_without_small_disks()
    disk = tmp_path / "disk"
    [outcome] = on_small_disk(disk, "2m", python(TWO_RANKS, Path(__file__).parent, *TINY, "--run-dir", disk / "run",
                                                "--steps", "1", save))
    assert outcome.status == 0, outcome.stderr[-3000:]
    results = json.loads(outcome.stdout)
    assert [status for status, _ in results] == [1, 1]
    errors = "".join(err for _, err in results)
    assert [line for line in errors.splitlines() if "No space left on device" in line] == [
        f"cogvx: error: No space left on device while writing {disk}/run/checkpoints/step_00000001; free space there "
        f"(or write elsewhere) and run it again"]
    assert "Traceback" not in errors + outcome.stderr
    assert "run/checkpoints" in outcome.left
    assert [name for name in outcome.left if name.startswith("run/checkpoints/")] == []
