"""Run set-up across ranks: the shared-filesystem check for checkpoints, and reading checkpoints inside a
running job without touching its process groups."""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks


def shared_filesystem_check(rank: int, world_size: int, run_dirs: list) -> str:
    import torch.distributed as dist

    from cogvx_mega.config import ConfigError
    from cogvx_mega.training.checkpoint import check_shared_filesystem

    dist.init_process_group("gloo")
    try:
        check_shared_filesystem(run_dirs[rank])
    except ConfigError as error:
        return str(error)
    return "ok"


@pytest.mark.timeout(120)
def test_a_checkpoint_folder_other_ranks_cannot_see_stops_the_run(tmp_path):
    shared = str(tmp_path / "shared")
    assert run_ranks(2, shared_filesystem_check, [shared, shared]) == ["ok", "ok"]
    assert [p.name for p in (tmp_path / "shared" / "checkpoints").iterdir()] == []  # the probe is removed
    # node-local disks at the same path: rank 1 looks into another folder than the one rank 0 wrote
    local = [str(tmp_path / "node0" / "run"), str(tmp_path / "node1" / "run")]
    errors = run_ranks(2, shared_filesystem_check, local)
    assert all("ranks [1]" in error and "shares" in error for error in errors)  # the same verdict on every rank
    assert not (tmp_path / "node0" / "run").exists()  # nothing left behind


def save_one_step(rank: int, world_size: int, run_dir: str) -> None:
    from cogvx_mega.config import load_config
    from cogvx_mega.data.latent_dataset import synthetic_dataset_for
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.trainer import Trainer

    config = load_config("tiny", overrides=["data.num_synthetic_clips=4", "training.steps=1",
                                            "parallel.tensor_model_parallel_size=2"])
    dims = initialize_parallel(config.parallel, device="cpu", seed=config.training.seed)
    Trainer(config, dims, build_model_chunks(config.model, config.parallel), synthetic_dataset_for(config),
            run_dir=run_dir).fit()


def read_inside_a_running_job(rank: int, world_size: int, checkpoint: str, inputs: tuple) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    import cogvx_mega
    from cogvx_mega.checkpoint.reader import read_transformer_checkpoint
    from cogvx_mega.config import ParallelConfig
    from cogvx_mega.parallel.state import initialize_parallel

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=2), device="cpu")
    groups = (dist.group.WORLD, parallel_state.get_tensor_model_parallel_group(),
              parallel_state.get_data_parallel_group(), parallel_state.get_context_parallel_group())
    _, state, _ = read_transformer_checkpoint(checkpoint)
    model = cogvx_mega.from_pretrained(checkpoint)
    with torch.no_grad():
        output = model(*inputs)
    after = (dist.group.WORLD, parallel_state.get_tensor_model_parallel_group(),
             parallel_state.get_data_parallel_group(), parallel_state.get_context_parallel_group())
    dist.barrier()  # the job's own groups still work
    return {"same_groups": all(a is b for a, b in zip(groups, after)),
            "tp_size": parallel_state.get_tensor_model_parallel_world_size(), "output": output,
            "qkv": state["decoder.layers.0.self_attention.linear_qkv.weight"]}


def read_alone(rank: int, world_size: int, checkpoint: str, inputs: tuple) -> dict:
    import cogvx_mega

    model = cogvx_mega.from_pretrained(checkpoint)  # a process that had no process group
    with torch.no_grad():
        return {"output": model(*inputs), "qkv": model.state_dict()["decoder.layers.0.self_attention.linear_qkv.weight"]}


@pytest.mark.timeout(180)
def test_reading_checkpoints_inside_a_job_leaves_its_process_groups_alone(tmp_path):
    run_ranks(2, save_one_step, str(tmp_path))  # a TP2 sharded training checkpoint
    checkpoint = str(tmp_path / "checkpoints" / "step_00000001")
    inputs = (torch.randn(1, 3, 4, 8, 8), torch.randn(1, 16, 32), torch.tensor([10]))
    reference = run_ranks(1, read_alone, checkpoint, inputs)[0]
    for rank, result in enumerate(run_ranks(2, read_inside_a_running_job, checkpoint, inputs)):
        assert result["same_groups"] and result["tp_size"] == 2, rank
        assert torch.equal(result["output"], reference["output"]), rank  # the whole model on this rank alone
        assert torch.equal(result["qkv"], reference["qkv"])
