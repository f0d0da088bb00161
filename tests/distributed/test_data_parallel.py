"""Data parallel on gloo ranks equals one process holding the whole global batch."""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks

STEPS = 3
MICRO_BATCH = 2


def fixed_randomness(global_batch: int, latent_shape, step: int) -> dict:
    """Noise, timesteps and text dropout of the whole global batch at `step`, fixed by the test."""
    generator = torch.Generator().manual_seed(1000 + step)
    return {"noise": torch.randn(global_batch, *latent_shape, generator=generator),
            "timesteps": torch.randint(0, 1000, (global_batch,), generator=generator),
            "text_drop_mask": torch.rand(global_batch, generator=generator) < 0.3}


def train_rank(rank: int, world_size: int, micro_batch: int, run_dir: str) -> dict:
    from cogvx_mega.config import load_config
    from cogvx_mega.data.latent_dataset import rank_batch, synthetic_dataset_for
    from cogvx_mega.model.transformer import build_model
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.trainer import Trainer

    config = load_config("tiny", overrides=[f"training.run_dir='{run_dir}'", "data.num_synthetic_clips=8",
                                            f"training.steps={STEPS}", f"training.micro_batch_size={micro_batch}"])
    dims = initialize_parallel(config.parallel, device="cpu", seed=config.training.seed)
    torch.manual_seed(rank)  # different initial weights per rank: the trainer must broadcast rank 0's
    model = build_model(config.model, config.parallel, device="cpu")
    trainer = Trainer(config, dims, model, synthetic_dataset_for(config), run_dir=run_dir)
    global_batch = micro_batch * dims.data_parallel_size
    losses, grad_norms = [], []
    for step in range(STEPS):
        batch = rank_batch(trainer.dataset, step, micro_batch, dims.data_parallel_rank, dims.data_parallel_size,
                           config.training.seed)
        fixed = fixed_randomness(global_batch, trainer.dataset.latents.shape[1:], step)
        mine = slice(dims.data_parallel_rank * micro_batch, (dims.data_parallel_rank + 1) * micro_batch)
        batch.update({k: v[mine] for k, v in fixed.items()})
        metrics = trainer.train_step(batch)
        losses.append(metrics["loss"])
        grad_norms.append(metrics["grad_norm"])
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"losses": losses, "grad_norms": grad_norms, "params": params}


@pytest.mark.timeout(180)
def test_two_data_parallel_ranks_equal_one_rank_with_double_batch(tmp_path):
    single = run_ranks(1, train_rank, 2 * MICRO_BATCH, str(tmp_path / "single"))[0]
    parallel = run_ranks(2, train_rank, MICRO_BATCH, str(tmp_path / "dp2"))
    for rank_result in parallel:
        assert rank_result["losses"] == pytest.approx(single["losses"], rel=1e-5)
        assert rank_result["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-5)
        assert torch.allclose(rank_result["params"], single["params"], rtol=1e-5, atol=1e-6)
    # the replicas stay identical to each other
    assert torch.equal(parallel[0]["params"], parallel[1]["params"])


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
