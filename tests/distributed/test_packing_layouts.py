"""Packed training (data.packing) at every kind of parallel layout equals one process, and progressive stages.

Clips of four buckets (videos of two sizes and durations, a short clip and 1-frame images) are packed into
4 packs of at most 160 tokens per step. The 15-token text gives clip lengths (63, 31, 27) that CP must pad
per clip; matrices at std 0.2 make attention matter, so a leak across clips, a lost pad mask or a wrong
per-clip split would move the loss past the 1e-5 relative tolerance.
"""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks
from test_layouts import layout

STEPS = 3
PACKING = ("data.num_synthetic_clips=24", "training.micro_batch_size=1", "training.global_batch_size=4",
           "data.buckets=[9x64x64,1x64x64,5x32x64,9x32x32]", "data.packing=true", "data.pack_tokens=160",
           "model.max_text_seq_length=15", "diffusion.text_dropout=0.3")
MATRIX_SCALE = 10.0


LAYOUTS = {
    "tp2-sp": layout(2, 2, 1, 1, "parallel.sequence_parallel=true"),
    "cp2-ulysses": layout(2, 1, 1, 2, "parallel.context_parallel_attention=a2a"),
    "cp2-allgather": layout(2, 1, 1, 2, "parallel.context_parallel_attention=all_gather"),
    "pp2": layout(2, pp=2),
    "dp2": layout(2),
    "tp2-sp-recompute-full": layout(2, 2, 1, 1, "parallel.sequence_parallel=true", "training.recompute=full",
                                    "training.recompute_num_layers=2"),
}


def train_packed(rank: int, world_size: int, overrides: tuple = (), steps: range = range(STEPS),
                 resume_from: str | None = None, save_to: str | None = None) -> dict:
    from cogvx_mega.config import load_config
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.tools.training_data import open_training_data
    from cogvx_mega.training.trainer import Trainer

    config = load_config("tiny", overrides=[*PACKING, *overrides])
    dims = initialize_parallel(config.parallel, device="cpu", seed=config.training.seed)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu", seed=config.training.seed,
                                recompute=config.training.recompute,
                                recompute_num_layers=config.training.recompute_num_layers)
    with torch.no_grad():
        for chunk in chunks:
            for param in chunk.parameters():
                if param.dim() >= 2:
                    param.mul_(MATRIX_SCALE)
    dataset = open_training_data(config)
    trainer = Trainer(config, dims, chunks, dataset, run_dir=save_to or "/tmp/cogvx-packing-test")
    if resume_from:
        trainer.load(resume_from)
        assert trainer.step == steps.start
    history, shapes = [], []
    for step in steps:
        batch = dataset.step_batch(step, trainer.slots, trainer.global_batch, config.training.seed)
        shapes.append(sorted({tuple(clip.shape) for pack in batch["packs"] for clip in pack["latents"]}))
        metrics = trainer.train_step(batch)
        history.append((metrics["loss"], metrics["grad_norm"]))
    if save_to:
        trainer.save()
        trainer.finalize_saves(blocking=True)
    return {"history": history, "shapes": shapes}


@pytest.fixture(scope="module")
def single_process():
    return run_ranks(1, train_packed)[0]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_packed_layout_matches_single_process(name, single_process):
    spec = LAYOUTS[name]
    for rank, result in enumerate(run_ranks(spec["world"], train_packed, tuple(spec["overrides"]))):
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(result["history"], single_process["history"])):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"{name} rank {rank} step {step} loss"
            assert norm == pytest.approx(ref_norm, rel=1e-5), f"{name} rank {rank} step {step} grad norm"


# Progressive resolution: small clips (32px videos and 64px images) for steps 0-1, then 64px videos.
STAGES = ("data.stages=[{until_step: 2, buckets: [9x32x32, 1x64x64]}, {buckets: [9x64x64, 5x32x64]}]",)
SWITCH = 2


@pytest.mark.timeout(240)
def test_stage_switch_changes_resolution_and_resume_across_it_equals_the_uninterrupted_run(tmp_path):
    from cogvx_mega.config import load_config
    from cogvx_mega.data.buckets import Bucket

    config = load_config("tiny", overrides=[*PACKING, *STAGES])
    stage_grids = []
    for _, _, data in config.data.stage_configs():
        stage_grids.append({((b.frames - 1) // 4 + 1, config.model.in_channels, b.height // 8, b.width // 8)
                            for b in map(Bucket.parse, data.buckets)})
    steps = SWITCH + 2
    whole = run_ranks(1, train_packed, STAGES, range(steps))[0]
    for step, shapes in enumerate(whole["shapes"]):
        assert set(shapes) <= stage_grids[0 if step < SWITCH else 1], f"step {step} has clips {shapes}"
    first = run_ranks(1, train_packed, STAGES, range(SWITCH - 1), None, str(tmp_path / "run"))[0]
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{SWITCH - 1:08d}"
    assert checkpoint.is_dir(), sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    # resumed at 2 ranks (data parallel), one step before the switch
    rest = run_ranks(2, train_packed, STAGES, range(SWITCH - 1, steps), str(checkpoint))
    assert [v for pair in first["history"] for v in pair] == pytest.approx(
        [v for pair in whole["history"][:SWITCH - 1] for v in pair], rel=1e-5)
    for rank, result in enumerate(rest):
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(result["history"],
                                                                        whole["history"][SWITCH - 1:])):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"rank {rank} step {SWITCH - 1 + step} loss"
            assert norm == pytest.approx(ref_norm, rel=1e-5), f"rank {rank} step {SWITCH - 1 + step} grad norm"
