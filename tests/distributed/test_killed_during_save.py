"""A run SIGKILLed in the middle of writing a checkpoint resumes from the previous complete one and loses nothing else."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from launcher import run_ranks

STEPS = 4


def train(rank: int, world_size: int, run_dir: str, resume: bool = False, stall_at_step: int | None = None,
          marker: str | None = None) -> list[float]:
    from cogvx_mega.training.checkpoint import find_resume_checkpoint
    from cogvx_mega.config import load_config
    from cogvx_mega.data.latent_dataset import synthetic_dataset_for
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training import checkpoint
    from cogvx_mega.training.trainer import Trainer

    if stall_at_step is not None:  # freeze just before the checkpoint of `stall_at_step` is renamed into place
        real_replace = os.replace
        stalled = f".step_{stall_at_step:08d}.tmp"

        def replace(source, destination):
            if os.path.basename(str(source)) == stalled:
                open(marker, "w").close()
                time.sleep(600)
            return real_replace(source, destination)

        checkpoint.os.replace = replace
    config = load_config("tiny", overrides=["data.num_synthetic_clips=8", f"training.steps={STEPS}",
                                            "training.save_interval=1", "training.keep_checkpoints=3",
                                            f"training.run_dir='{run_dir}'"])
    dims = initialize_parallel(config.parallel, device="cpu", seed=config.training.seed)
    trainer = Trainer(config, dims, build_model_chunks(config.model, config.parallel, seed=config.training.seed),
                      synthetic_dataset_for(config))
    if resume:
        trainer.load(find_resume_checkpoint("auto", run_dir))
    return [metrics["loss"] for metrics in trainer.fit()]


def _run_in_own_session(run_dir: str, marker: str) -> None:
    os.setsid()  # one process group with everything it starts (checkpoint writers, queue server)
    import torch

    torch.set_num_threads(1)
    train(0, 1, run_dir, False, 2, marker)


@pytest.mark.timeout(240)
def test_sigkill_during_save_resumes_from_previous_checkpoint(tmp_path):
    uninterrupted = run_ranks(1, train, str(tmp_path / "straight"))[0]

    run_dir, marker = str(tmp_path / "killed"), str(tmp_path / "in-save")
    child = mp.get_context("fork").Process(target=_run_in_own_session, args=(run_dir, marker))
    child.start()
    deadline = time.time() + 120
    while not os.path.exists(marker):
        assert time.time() < deadline and child.is_alive(), "the run never reached the step-2 save"
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGKILL)  # the run and every process it started, mid-save
    child.join(10)

    checkpoints = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step_00000001"]
    assert (checkpoints / ".step_00000002.tmp").is_dir()  # the half-written save, never listed

    resumed = run_ranks(1, train, run_dir, True)[0]
    assert resumed == pytest.approx(uninterrupted[1:], rel=1e-6)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001", "step_00000002", "step_00000003",
                                                             "step_00000004"][-3:]
