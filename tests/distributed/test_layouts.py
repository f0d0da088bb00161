"""Parallel layouts train exactly like one process: 3 steps of the tiny model, loss and grad norm within 1e-5 relative.

Layouts land here as they are built (issue #3); each entry gives the TP size, the world size and sequence parallel.
"""
from __future__ import annotations

import pytest

from launcher import run_ranks
from test_data_parallel import fixed_randomness

STEPS = 3
GLOBAL_BATCH = 4

LAYOUTS = {
    "tp2": dict(tp=2, world=2),
    "tp2-sp": dict(tp=2, world=2, sp=True),
    "tp2-dp2": dict(tp=2, world=4),
    "tp2-sp-dp2": dict(tp=2, world=4, sp=True),
}


def train_layout(rank: int, world_size: int, tp: int, sp: bool = False) -> list[tuple[float, float]]:
    from cogvx_mega.config import load_config
    from cogvx_mega.data.latent_dataset import rank_batch, synthetic_dataset_for
    from cogvx_mega.model.transformer import build_model
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.trainer import Trainer

    dp = world_size // tp
    config = load_config("tiny", overrides=["data.num_synthetic_clips=8", f"parallel.tensor_model_parallel_size={tp}",
                                            f"training.micro_batch_size={GLOBAL_BATCH // dp}",
                                            f"parallel.sequence_parallel={str(sp).lower()}"])
    dims = initialize_parallel(config.parallel, device="cpu", seed=config.training.seed)
    # use_cpu_initialization with one seed: every TP shard equals the matching slice of the TP=1 weights
    model = build_model(config.model, config.parallel, device="cpu")
    trainer = Trainer(config, dims, model, synthetic_dataset_for(config), run_dir="/tmp/cogvx-layout-test")
    micro = GLOBAL_BATCH // dp
    history = []
    for step in range(STEPS):
        batch = rank_batch(trainer.dataset, step, micro, dims.data_parallel_rank, dp, config.training.seed)
        fixed = fixed_randomness(GLOBAL_BATCH, trainer.dataset.latents.shape[1:], step)
        mine = slice(dims.data_parallel_rank * micro, (dims.data_parallel_rank + 1) * micro)
        batch.update({k: v[mine] for k, v in fixed.items()})
        metrics = trainer.train_step(batch)
        history.append((metrics["loss"], metrics["grad_norm"]))
    return history


@pytest.fixture(scope="module")
def single_process():
    return run_ranks(1, train_layout, 1)[0]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, single_process):
    spec = LAYOUTS[layout]
    for rank, history in enumerate(run_ranks(spec["world"], train_layout, spec["tp"], spec.get("sp", False))):
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(history, single_process)):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"{layout} rank {rank} step {step} loss"
            assert norm == pytest.approx(ref_norm, rel=1e-5), f"{layout} rank {rank} step {step} grad norm"
