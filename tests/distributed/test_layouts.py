"""Parallel layouts train exactly like one process: 4 steps of the tiny model, loss and grad norm within 1e-5 relative.

Every layout takes the same 4 samples per step (the global batch) as micro-batches of 1 split over its
data-parallel ranks, and the single-process reference accumulates the same 4 micro-batches. Nothing is
fixed by hand: every layout draws its own noise, timesteps and text dropout, which are keyed on the global
sample slot and so must come out the same at any data-parallel size.
"""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks

STEPS = 4
GLOBAL_BATCH = 4

def layout(world: int, tp: int = 1, pp: int = 1, cp: int = 1, *extra: str) -> dict:
    return {"world": world, "overrides": [f"parallel.tensor_model_parallel_size={tp}",
                                          f"parallel.pipeline_model_parallel_size={pp}",
                                          f"parallel.context_parallel_size={cp}", *extra]}


LAYOUTS = {
    "tp2": layout(2, tp=2),
    "tp2-sp": layout(2, 2, 1, 1, "parallel.sequence_parallel=true"),
    "tp2-dp2": layout(4, tp=2),
    "pp2-dp2": layout(4, pp=2),
    "pp2-vpp2-dp2-distributed-optimizer": layout(4, 1, 2, 1, "parallel.virtual_pipeline_model_parallel_size=2",
                                                 "parallel.use_distributed_optimizer=true"),
    "cp2-dp2": layout(4, cp=2),
    # Buckets of ~1000 parameters split the replicated timestep embedding (3,136 parameters) over both
    # data-parallel shards, at different offsets on the two stages.
    "pp2-dp2-distributed-optimizer-small-buckets": layout(4, 1, 2, 1, "parallel.use_distributed_optimizer=true",
                                                          "parallel.overlap_grad_reduce=true",
                                                          "parallel.ddp_bucket_size=1000"),
    "tp2-sp-dp2": layout(4, 2, 1, 1, "parallel.sequence_parallel=true"),
    "pp2": layout(2, pp=2),
    "pp2-vpp2": layout(2, 1, 2, 1, "parallel.virtual_pipeline_model_parallel_size=2"),
    "pp4-vpp2": layout(4, 1, 4, 1, "parallel.virtual_pipeline_model_parallel_size=2"),
    "pp4-uneven": layout(4, 1, 4, 1, "parallel.num_layers_in_first_pipeline_stage=1",
                         "parallel.num_layers_in_last_pipeline_stage=1"),
    "tp2-pp2": layout(4, tp=2, pp=2),
    "cp2-ulysses": layout(2, 1, 1, 2, "parallel.context_parallel_attention=a2a"),
    "cp2-allgather": layout(2, 1, 1, 2, "parallel.context_parallel_attention=all_gather"),
    "tp2-cp2": layout(4, tp=2, cp=2),
    "pp2-cp2-dp2": layout(8, pp=2, cp=2),
    "dp2-distributed-optimizer": layout(2, 1, 1, 1, "parallel.use_distributed_optimizer=true"),
    "dp2-distributed-optimizer-overlap": layout(2, 1, 1, 1, "parallel.use_distributed_optimizer=true",
                                                "parallel.overlap_grad_reduce=true",
                                                "parallel.overlap_param_gather=true"),
    "tp2-recompute-full": layout(2, 2, 1, 1, "training.recompute=full", "training.recompute_num_layers=2"),
    "pp2-recompute-selective": layout(2, 1, 2, 1, "training.recompute=selective"),
}


def train_layout(rank: int, world_size: int, overrides: tuple = (), steps: range = range(STEPS),
                 resume_from: str | None = None, save_to: str | None = None, matrix_scale: float = 1.0,
                 save_at: int | None = None) -> dict:
    """Train `steps` at the layout given by `overrides`, optionally resuming from / saving a checkpoint
    (at the end, or when the trainer reaches step `save_at`; an async save is finalized at the end)."""
    from cogvx_mega.config import load_config
    from cogvx_mega.data.latent_dataset import synthetic_dataset_for
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.trainer import Trainer

    config = load_config("tiny", overrides=["data.num_synthetic_clips=8", "training.micro_batch_size=1",
                                            f"training.global_batch_size={GLOBAL_BATCH}", "diffusion.text_dropout=0.3",
                                            *overrides])
    dims = initialize_parallel(config.parallel, device="cpu", seed=config.training.seed)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu", seed=config.training.seed,
                                recompute=config.training.recompute,
                                recompute_num_layers=config.training.recompute_num_layers)
    if matrix_scale != 1.0:  # larger weights make attention dominate (same transform at every layout)
        with torch.no_grad():
            for chunk in chunks:
                for param in chunk.parameters():
                    if param.dim() >= 2:
                        param.mul_(matrix_scale)
    trainer = Trainer(config, dims, chunks, synthetic_dataset_for(config), run_dir=save_to or "/tmp/cogvx-layout-test")
    if resume_from:
        trainer.load(resume_from)
        assert trainer.step == steps.start
    history = []
    visible_before_finalize = None  # whether the saved folder existed before the (async) save was finalized
    for step in steps:
        assert trainer.step == step
        metrics = trainer.train_step(trainer.dataset.step_batch(step, trainer.slots, trainer.global_batch,
                                                                config.training.seed))
        history.append((metrics["loss"], metrics["grad_norm"]))
        if save_to and trainer.step == save_at:
            visible_before_finalize = trainer.save().exists()
    if save_to and save_at is None:
        visible_before_finalize = trainer.save().exists()
    trainer.finalize_saves(blocking=True)
    trainer.finish_parameter_sync()
    # The timestep embedding is replicated on every pipeline chunk; its copies must all follow the
    # single-process weights (Adam moves them by ~lr per step, so a wrong gradient shows at once).
    conditioning = [torch.cat([p.detach().reshape(-1) for p in chunk.time_embedding.parameters()])
                    for chunk in chunks]
    # what `cogvx train --dry-run` promises for this rank
    from cogvx_mega.tools.plan import plan_layout
    from megatron.core import parallel_state

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    planned = sum(plan.parameters_per_tp_rank for plan in plan_layout(config) if plan.pipeline_rank == pp_rank)
    actual = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    return {"history": history, "conditioning": conditioning, "planned": planned, "actual": actual,
            "visible_before_finalize": visible_before_finalize}


@pytest.fixture(scope="module")
def single_process():
    return run_ranks(1, train_layout)[0]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, single_process):
    spec = LAYOUTS[layout]
    reference = single_process["conditioning"][0]
    for rank, result in enumerate(run_ranks(spec["world"], train_layout, tuple(spec["overrides"]))):
        assert result["planned"] == result["actual"], f"{layout} rank {rank}: dry-run parameter count"
        for copy in result["conditioning"]:
            assert torch.allclose(copy, reference, rtol=1e-5, atol=1e-7), f"{layout} rank {rank} conditioning"
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(result["history"], single_process["history"])):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"{layout} rank {rank} step {step} loss"
            assert norm == pytest.approx(ref_norm, rel=1e-5), f"{layout} rank {rank} step {step} grad norm"


# A 15-token text makes 63 tokens, which do not split into 2 x CP or over TP under sequence parallel:
# the model pads to 64 and masks the pad as attention keys and in the loss.
ODD_TEXT = "model.max_text_seq_length=15"
PADDED_LAYOUTS = {
    "cp2-ulysses-padded": layout(2, 1, 1, 2, ODD_TEXT),
    "cp2-allgather-padded": layout(2, 1, 1, 2, ODD_TEXT, "parallel.context_parallel_attention=all_gather"),
    "tp2-sp-padded": layout(2, 2, 1, 1, ODD_TEXT, "parallel.sequence_parallel=true"),
    "pp2-cp2-padded": layout(4, 1, 2, 2, ODD_TEXT),
}


# At the default init (std 0.02) the gated attention branch barely moves the loss, so an unmasked pad
# key would hide under the tolerance; std 0.2 matrices make attention matter.
MATRIX_SCALE = 10.0


@pytest.fixture(scope="module")
def single_process_odd_text():
    return run_ranks(1, train_layout, (ODD_TEXT,), range(STEPS), None, None, MATRIX_SCALE)[0]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout_name", sorted(PADDED_LAYOUTS))
def test_padded_layout_matches_single_process(layout_name, single_process_odd_text):
    spec = PADDED_LAYOUTS[layout_name]
    results = run_ranks(spec["world"], train_layout, tuple(spec["overrides"]), range(STEPS), None, None, MATRIX_SCALE)
    for rank, result in enumerate(results):
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(
                zip(result["history"], single_process_odd_text["history"])):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"{layout_name} rank {rank} step {step} loss"
            assert norm == pytest.approx(ref_norm, rel=1e-5), f"{layout_name} rank {rank} step {step} grad norm"
