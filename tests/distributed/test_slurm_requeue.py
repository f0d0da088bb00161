"""`cogvx launch slurm` against a real SLURM (slurmctld + slurmd + munge on localhost, tests/slurm_cluster.py): a
tiny CPU training runs as a 1-node job; the signal SLURM sends before the time limit (`--signal B:USR1@S`,
delivered here with `scancel --signal=USR1 --batch`) makes it checkpoint and requeue itself, and the requeued
job resumes with `--resume auto` and ends with the per-step losses and grad norms of an uninterrupted run."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from slurm_cluster import LocalSlurm, ensure_installed

TRAIN = ["--preset", "tiny", "--data", "synthetic", "--device", "cpu", "--steps", "6",
         "training.micro_batch_size=1", "data.num_synthetic_clips=4"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_installed()
    if reason is not None:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(420)
def test_a_job_requeued_at_its_time_limit_resumes_with_the_uninterrupted_losses(slurm, tmp_path):
    run = tmp_path / "run"
    launched = subprocess.run([sys.executable, "-m", "cogvx_mega.cli", "launch", "slurm", "--nodes", "1",
                               "--gpus-per-node", "1", "--time", "00:20:00", "--", *TRAIN, "--run-dir", str(run)],
                              capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr
    job_id = re.search(r"submitted job (\d+)", launched.stdout).group(1)
    log = run / "slurm" / f"cogvx-run-{job_id}.out"
    assert (run / "slurm" / "cogvx-run.sbatch").is_file()

    def log_text():
        return log.read_text() if log.exists() else ""

    wait_until(lambda: "cogvx: job" in log_text(), 120, "the job to start (its trap set)")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)  # what --signal does at the limit

    def requeued():
        info = slurm.job(job_id)
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            raise AssertionError(f"job {job_id} {info.get('JobState')}:\n{log_text()}")
        return info.get("Restarts") == "1" and info.get("JobState") == "PENDING"

    wait_until(requeued, 180, "the job to requeue itself")
    # SLURM revokes the old run's credential with a time stamp in whole seconds, and refuses a new start in that
    # same second ("Job credential revoked", the job then FAILED): let the second pass before skipping the delay
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)  # skip SLURM's 120 s delay
    info = slurm.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=180)
    text = log_text()
    assert info["JobState"] == "COMPLETED", text
    assert "time limit near: checkpoint, then requeue" in text and f"requeue job {job_id}" in text
    assert "(restart 1)" in text and "resumed from" in text

    interrupted = read_metrics(run)
    assert [m["step"] for m in interrupted] == [1, 2, 3, 4, 5, 6]  # stopped after step 1, resumed there
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-m", "cogvx_mega.cli", "train", *TRAIN, "--run-dir", str(straight)], check=True,
                   capture_output=True)
    expected = read_metrics(straight)
    for got, want in zip(interrupted, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6), got["step"]
