"""Data parallel on gloo ranks equals one process holding the whole global batch."""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks
from test_layouts import train_layout


@pytest.mark.timeout(180)
def test_two_data_parallel_ranks_equal_one_rank_with_double_batch():
    """2 ranks x micro-batch 2 against 1 rank x micro-batch 4, with noise, timesteps and dropout fixed by the test."""
    single = run_ranks(1, train_layout, ("training.micro_batch_size=4",))[0]
    parallel = run_ranks(2, train_layout, ("training.micro_batch_size=2",))
    for rank, result in enumerate(parallel):
        assert [loss for loss, _ in result["history"]] == pytest.approx(
            [loss for loss, _ in single["history"]], rel=1e-5), f"rank {rank} loss"
        assert [norm for _, norm in result["history"]] == pytest.approx(
            [norm for _, norm in single["history"]], rel=1e-5), f"rank {rank} grad norm"
        assert torch.allclose(result["conditioning"][0], single["conditioning"][0], rtol=1e-5, atol=1e-7)


@pytest.mark.timeout(180)
def test_explicit_uniform_sampling_is_keyed_on_data_parallel_rank(tmp_path):
    def draws(rank, world_size):
        from cogvx_mega.config import load_config
        from cogvx_mega.diffusion.timesteps import rank_interval
        from cogvx_mega.model.transformer import build_model
        from cogvx_mega.parallel.state import initialize_parallel
        from cogvx_mega.training.trainer import Trainer

        config = load_config("tiny", overrides=[f"training.run_dir='{tmp_path}'"])
        dims = initialize_parallel(config.parallel, device="cpu")
        trainer = Trainer(config, dims, build_model(config.model, device="cpu"))
        timesteps = torch.cat([trainer.step_randomness(8, torch.Size([8, 1]), s)["timesteps"] for s in range(4)])
        return timesteps, rank_interval(dims.data_parallel_rank, dims.data_parallel_size)

    results = run_ranks(2, draws)
    for timesteps, (low, high) in results:
        assert low <= timesteps.min() and timesteps.max() < high
    assert results[0][1] == (0, 500) and results[1][1] == (500, 1000)
