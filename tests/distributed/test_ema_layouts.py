"""The weight average at TP2, PP2 and DP2 with the distributed optimizer is the one process's (each rank averages
its own shard; the checkpoint reassembles it), and a resume at another layout continues it (issue 30)."""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks
from test_layouts import train_layout

EMA = ("training.ema_decay=0.5", "training.ema_start_step=1")
SINGLE = ("parallel.tensor_model_parallel_size=1", *EMA)
LAYOUTS = {
    "tp2": (2, ("parallel.tensor_model_parallel_size=2", *EMA)),
    "pp2": (2, ("parallel.pipeline_model_parallel_size=2", *EMA)),
    "dp2-distributed-optimizer": (2, ("parallel.use_distributed_optimizer=true", *SINGLE)),
}


def saved_average(run_dir, step: int) -> dict[str, torch.Tensor]:
    from cogvx_mega.checkpoint.meta import read_checkpoint_meta
    from cogvx_mega.checkpoint.sharded import read_sharded_model_state

    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    return read_sharded_model_state(folder, read_checkpoint_meta(folder), ema=True)[1]


def assert_same_average(found: dict, expected: dict, where: str) -> None:
    assert found.keys() == expected.keys(), where
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} {key}: {m}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run = tmp_path_factory.mktemp("ema_one")
    run_ranks(1, train_layout, SINGLE, range(3), None, str(run / "a"), 1.0, 3)
    run_ranks(1, train_layout, SINGLE, range(3, 5), str(run / "a" / "checkpoints" / "step_00000003"), str(run / "b"))
    return {3: saved_average(run / "a", 3), 5: saved_average(run / "b", 5)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_average_equals_one_process(name, one_process, tmp_path):
    world, overrides = LAYOUTS[name]
    run_ranks(world, train_layout, overrides, range(3), None, str(tmp_path), 1.0, 3)
    assert_same_average(saved_average(tmp_path, 3), one_process[3], name)


@pytest.mark.timeout(240)
def test_resume_at_another_layout_continues_the_average(one_process, tmp_path):
    tp_world, tp = LAYOUTS["tp2"]
    run_ranks(tp_world, train_layout, tp, range(3), None, str(tmp_path / "tp2"), 1.0, 3)
    pp_world, pp = LAYOUTS["pp2"]
    run_ranks(pp_world, train_layout, pp, range(3, 5), str(tmp_path / "tp2" / "checkpoints" / "step_00000003"),
              str(tmp_path / "pp2"))
    assert_same_average(saved_average(tmp_path / "pp2", 5), one_process[5], "tp2 -> pp2")
