"""Data parallel on gloo ranks equals one process holding the whole global batch, with the run's own
randomness (keyed on the global sample slot, so nothing needs fixing by hand)."""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks
from test_layouts import train_layout


@pytest.mark.timeout(180)
def test_two_data_parallel_ranks_equal_one_rank_with_double_batch():
    """2 ranks x micro-batch 2 against 1 rank x micro-batch 4 (global batch 4 both)."""
    single = run_ranks(1, train_layout, ("training.micro_batch_size=4",))[0]
    parallel = run_ranks(2, train_layout, ("training.micro_batch_size=2",))
    for rank, result in enumerate(parallel):
        assert [loss for loss, _ in result["history"]] == pytest.approx(
            [loss for loss, _ in single["history"]], rel=1e-5), f"rank {rank} loss"
        assert [norm for _, norm in result["history"]] == pytest.approx(
            [norm for _, norm in single["history"]], rel=1e-5), f"rank {rank} grad norm"
        assert torch.allclose(result["conditioning"][0], single["conditioning"][0], rtol=1e-5, atol=1e-7)
