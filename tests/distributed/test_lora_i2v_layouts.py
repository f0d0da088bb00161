"""LoRA at TP2 (+ sequence parallel) and PP2, and image-to-video training at TP2 and CP2, equal one process:
the same per-step losses and, for LoRA, the same trained adapters; the LoRA checkpoints resume at another
layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher import run_ranks

COMMON = ["data.num_synthetic_clips=8", "training.micro_batch_size=1", "training.global_batch_size=2",
          "training.steps=3", "training.lr=1e-2", "training.min_lr=1e-2", "training.warmup_steps=0", "training.device=cpu"]
LORA = ["finetune.lora_rank=4", "finetune.lora_alpha=8"]
LAYOUTS = {
    "one": [],
    "tp2-sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "cp2": ["parallel.context_parallel_size=2"],
}


def train(rank: int, world_size: int, preset: str, overrides: tuple, init_from, resume=None) -> list[float]:
    from cogvx_mega.run.training import run_training
    from cogvx_mega.config import load_config

    config = load_config(preset, overrides=list(overrides))
    return [m["loss"] for m in run_training(config, resume=resume, init_from=init_from)]


def adapters_of(run_dir: Path, step: int):
    from cogvx_mega.checkpoint.lora import read_lora_adapters
    from cogvx_mega.checkpoint.meta import read_checkpoint_meta

    path = run_dir / "checkpoints" / f"step_{step:08d}"
    return read_lora_adapters(path, read_checkpoint_meta(path))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from families import make_tiny_preset_diffusers_model

    folder = tmp_path_factory.mktemp("base") / "transformer"
    make_tiny_preset_diffusers_model().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def lora_reference(base, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora-one")
    losses = run_ranks(1, train, "tiny", (*COMMON, *LORA, f"training.run_dir='{run}'"), base)[0]
    return losses, adapters_of(run, 3)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["tp2-sp", "pp2"])
def test_lora_layouts_equal_one_process(layout, base, lora_reference, tmp_path):
    losses, adapters = lora_reference
    run = tmp_path / layout
    results = run_ranks(2, train, "tiny", (*COMMON, *LORA, *LAYOUTS[layout], f"training.run_dir='{run}'"), base)
    for rank, result in enumerate(results):
        assert result == pytest.approx(losses, rel=1e-5), f"{layout} rank {rank}"
    assert losses[-1] < losses[0]
    trained = adapters_of(run, 3)
    assert trained.keys() == adapters.keys()
    for key, (a, b) in adapters.items():
        assert b.abs().max() > 0, key  # the adapters trained
        diff = max((trained[key][0] - a).abs().max().item(), (trained[key][1] - b).abs().max().item())
        assert diff <= 1e-5, (key, diff)  # fp32 sums in another order, through 3 Adam steps of lr 1e-2
    # the TP2 checkpoint resumes in one process and continues the one-process run's line
    if layout == "tp2-sp":
        steps = [f"training.steps=4", f"training.run_dir='{run}'"]
        resumed = run_ranks(1, train, "tiny", (*COMMON, *LORA, *steps), base, "auto")[0]
        straight_dir = tmp_path / "straight"
        straight = run_ranks(1, train, "tiny", (*COMMON, *LORA, "training.steps=4",
                                                f"training.run_dir='{straight_dir}'"), base)[0]
        assert resumed == pytest.approx(straight[3:], rel=1e-5)


@pytest.fixture(scope="module")
def i2v_reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("i2v-one")
    return run_ranks(1, train, "tiny-i2v", (*COMMON, f"training.run_dir='{run}'"), None)[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["tp2", "cp2"])
def test_i2v_layouts_equal_one_process(layout, i2v_reference, tmp_path):
    results = run_ranks(2, train, "tiny-i2v", (*COMMON, *LAYOUTS[layout], f"training.run_dir='{tmp_path}'"), None)
    for rank, result in enumerate(results):
        assert result == pytest.approx(i2v_reference, rel=1e-5), f"{layout} rank {rank}"
