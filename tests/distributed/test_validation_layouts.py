"""The validation loss (overall and per timestep bin, the EMA's too) at DP2, TP2 and PP2 equals one process's
within rel 1e-5 after the same 2 training steps (issue 30)."""
from __future__ import annotations

import pytest

from launcher import run_ranks

COMMON = ("data.num_synthetic_clips=8", "training.micro_batch_size=1", "training.global_batch_size=4",
          "data.valid=synthetic", "training.valid_every=1", "training.valid_samples=4", "training.ema_decay=0.5",
          "training.lr=0.01")
LAYOUTS = {"dp2": (2, ()), "tp2": (2, ("parallel.tensor_model_parallel_size=2",)),
           "pp2": (2, ("parallel.pipeline_model_parallel_size=2",))}


def validate_after_two_steps(rank: int, world_size: int, overrides: tuple) -> dict:
    from cogvx_mega.config import load_config
    from cogvx_mega.data.latent_dataset import synthetic_dataset_for
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.tools.training_data import open_validation_data
    from cogvx_mega.training.trainer import Trainer

    config = load_config("tiny", overrides=[*COMMON, *overrides])
    dims = initialize_parallel(config.parallel, device="cpu", seed=config.training.seed)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu", seed=config.training.seed)
    trainer = Trainer(config, dims, chunks, synthetic_dataset_for(config), run_dir="/tmp/cogvx-valid-layout",
                      valid_dataset=open_validation_data(config))
    for step in range(2):
        trainer.train_step(trainer.dataset.step_batch(step, trainer.slots, trainer.global_batch, config.training.seed))
    return trainer.validator.measure()


@pytest.fixture(scope="module")
def one_process():
    return run_ranks(1, validate_after_two_steps, ())[0]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_validation_equals_one_process(name, one_process):
    world, overrides = LAYOUTS[name]
    for rank, found in enumerate(run_ranks(world, validate_after_two_steps, overrides)):
        for key in ("valid_loss", "valid_loss_ema"):
            assert found[key] == pytest.approx(one_process[key], rel=1e-5), (name, rank, key)
            assert found[f"{key}_by_bin"] == pytest.approx(one_process[f"{key}_by_bin"], rel=1e-5), (name, rank, key)
