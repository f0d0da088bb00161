"""Parallel layouts train exactly like one process: 3 steps of the tiny model, loss and grad norm within 1e-5 relative.

Every layout takes the same 4 samples per step as 4 micro-batches of 1 (split over data-parallel
ranks), so the single-process reference accumulates the same 4 micro-batches. Layouts land here as
they are built (issue #3).
"""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks
from test_data_parallel import fixed_randomness

STEPS = 3
GLOBAL_BATCH = 4

LAYOUTS = {
    "tp2": dict(tp=2, world=2),
    "tp2-sp": dict(tp=2, world=2, sp=True),
    "tp2-dp2": dict(tp=2, world=4),
    "tp2-sp-dp2": dict(tp=2, world=4, sp=True),
    "pp2": dict(pp=2, world=2),
    "pp2-vpp2": dict(pp=2, vpp=2, world=2),
    "pp4-vpp2": dict(pp=4, vpp=2, world=4),
    "tp2-pp2": dict(tp=2, pp=2, world=4),
    "cp2-ulysses": dict(cp=2, cp_kind="a2a", world=2),
    "cp2-allgather": dict(cp=2, cp_kind="all_gather", world=2),
    "tp2-cp2": dict(tp=2, cp=2, world=4),
    "pp2-cp2-dp2": dict(pp=2, cp=2, world=8),
}


def train_layout(rank: int, world_size: int, tp: int = 1, sp: bool = False, pp: int = 1,
                 vpp: int | None = None, cp: int = 1, cp_kind: str = "a2a") -> dict:
    from cogvx_mega.config import load_config
    from cogvx_mega.data.latent_dataset import rank_batch, synthetic_dataset_for
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.trainer import Trainer

    config = load_config("tiny", overrides=[
        "data.num_synthetic_clips=8", "training.micro_batch_size=1", f"training.global_batch_size={GLOBAL_BATCH}",
        f"parallel.tensor_model_parallel_size={tp}", f"parallel.sequence_parallel={str(sp).lower()}",
        f"parallel.pipeline_model_parallel_size={pp}",
        f"parallel.virtual_pipeline_model_parallel_size={vpp if vpp else 'null'}",
        f"parallel.context_parallel_size={cp}", f"parallel.context_parallel_attention={cp_kind}"])
    dims = initialize_parallel(config.parallel, device="cpu", seed=config.training.seed)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu", seed=config.training.seed)
    trainer = Trainer(config, dims, chunks, synthetic_dataset_for(config), run_dir="/tmp/cogvx-layout-test")
    samples = trainer.samples_per_rank
    history = []
    for step in range(STEPS):
        batch = rank_batch(trainer.dataset, step, samples, dims.data_parallel_rank, dims.data_parallel_size,
                           config.training.seed)
        fixed = fixed_randomness(GLOBAL_BATCH, trainer.dataset.latents.shape[1:], step)
        mine = slice(dims.data_parallel_rank * samples, (dims.data_parallel_rank + 1) * samples)
        batch.update({k: v[mine] for k, v in fixed.items()})
        metrics = trainer.train_step(batch)
        history.append((metrics["loss"], metrics["grad_norm"]))
    # The timestep embedding is replicated on every pipeline chunk; its copies must all follow the
    # single-process weights (Adam moves them by ~lr per step, so a wrong gradient shows at once).
    conditioning = [torch.cat([p.detach().reshape(-1) for p in chunk.time_embedding.parameters()])
                    for chunk in chunks]
    return {"history": history, "conditioning": conditioning}


@pytest.fixture(scope="module")
def single_process():
    return run_ranks(1, train_layout)[0]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, single_process):
    spec = LAYOUTS[layout]
    options = {k: v for k, v in spec.items() if k != "world"}
    reference = single_process["conditioning"][0]
    for rank, result in enumerate(run_ranks(spec["world"], lambda r, w: train_layout(r, w, **options))):
        for copy in result["conditioning"]:
            assert torch.allclose(copy, reference, rtol=1e-5, atol=1e-7), f"{layout} rank {rank} conditioning"
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(result["history"], single_process["history"])):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"{layout} rank {rank} step {step} loss"
            assert norm == pytest.approx(ref_norm, rel=1e-5), f"{layout} rank {rank} step {step} grad norm"
