"""A run SIGKILLed again and again, each time resumed with `--resume auto`, ends where the uninterrupted run
ends: the same per-step losses (a step trained again gives the same loss) and the same final weights.

The kills hit, in a seeded random order and at seeded random steps, the four dangerous moments
(`cogvx_mega.checkpoint.faults`): inside a training step, while a synchronous save writes its shards, while
an asynchronous save's background writer runs, and between the written shards and metadata and the rename.
Each kill takes the whole process group (the background writer too), as a lost node does."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS, SAVE_EVERY = 12, 2
TRAIN = [sys.executable, "-m", "cogvx_mega.cli", "train", "--preset", "tiny", "--device", "cpu",
         "--steps", str(STEPS), "data.num_synthetic_clips=8", "training.micro_batch_size=2", "training.lr=2e-3",
         "training.min_lr=2e-3", "training.warmup_steps=0", f"training.save_interval={SAVE_EVERY}",
         "training.keep_checkpoints=2", "model.num_layers=4"]
KINDS = ("step", "save", "async_write", "rename")


def run(run_dir: Path, fault: str | None, log: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("COGVX_FAULT_INJECT", None)
    if fault:
        env.update(COGVX_FAULT_INJECT=fault, COGVX_FAULT_INJECT_LOG=str(log))
    async_save = fault is not None and fault.startswith("async_write")
    command = [*TRAIN, "--run-dir", str(run_dir), "--resume", "auto", f"training.async_save={str(async_save).lower()}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, start_new_session=True, timeout=300)
    if done.returncode not in (0, -9):
        raise AssertionError(f"{fault}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return done.returncode


def newest_step(run_dir: Path) -> int:
    from cogvx_mega.training.checkpoint import list_checkpoints, step_of

    found = list_checkpoints(run_dir)
    return step_of(found[-1]) if found else 0


def losses_by_step(run_dir: Path) -> dict[int, float]:
    seen: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        metrics = json.loads(line)
        assert seen.setdefault(metrics["step"], metrics["loss"]) == metrics["loss"], f"step {metrics['step']} again"
    return seen


def final_weights(run_dir: Path) -> dict:
    from cogvx_mega.checkpoint.reader import read_transformer_checkpoint
    from cogvx_mega.training.checkpoint import step_folder

    return read_transformer_checkpoint(step_folder(run_dir, STEPS))[1]


@pytest.mark.timeout(900)
def test_kills_at_random_moments_resume_to_the_uninterrupted_run(tmp_path, record_property):
    rng = random.Random(20261202)
    straight = tmp_path / "straight"
    assert run(straight, None, tmp_path / "unused.log") == 0

    killed, log = tmp_path / "killed", tmp_path / "kills.log"
    kinds = list(KINDS) * 2  # K = 8: each kind twice, in a random order
    rng.shuffle(kinds)
    planned = []
    for kind in kinds:
        done = newest_step(killed)
        window = 2 * SAVE_EVERY  # within two saves of the resume point, so the kills spread over the run
        if kind == "step":
            step = rng.randrange(done, min(done + window, STEPS))  # inside step `step` (0-based), before its update
        else:
            step = rng.choice([s for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY) if done < s <= done + window])
        planned.append(f"{kind}@{step}")
        assert run(killed, planned[-1], log) == -9, f"{planned[-1]} did not kill the run"
    hit = log.read_text().splitlines()
    assert [h.split()[0] for h in hit] == planned  # every kill happened where it was aimed, once
    assert run(killed, None, log) == 0  # the last start finishes the run
    report = f"K={len(hit)} kills: {', '.join(hit)}"
    record_property("kills", report)
    print(report)
    assert {h.split("@")[0] for h in hit} == set(KINDS)

    assert losses_by_step(killed) == losses_by_step(straight), report
    reference, final = final_weights(straight), final_weights(killed)
    assert all(torch.equal(final[key], reference[key]) for key in reference), report
