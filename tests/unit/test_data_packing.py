"""The packer: every clip of an epoch in exactly one pack, no pack over its budget, packs at least 95% full on
the reference mix (CogVideoX-5B scale: 49/25/13-frame videos in two orientations, 256px clips and images);
the plan is a pure function of the seed and the step; config errors name the value and the fix."""
from __future__ import annotations

import collections

import pytest

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.model import ModelConfig
from cogvx_mega.data.packing import (PackPlan, best_fit_decreasing, packing_efficiency, reference_mix_grids)
from cogvx_mega.model.packing import ClipShape, clip_tokens

MODEL_5B = ModelConfig(num_layers=42, num_attention_heads=48, attention_head_dim=64, positional_embedding="rope")
LONGEST = clip_tokens(MODEL_5B, ClipShape(13, 60, 90, 226))  # a 49 x 480 x 720 clip with its text


def reference_plan(count: int = 3000, pack_tokens: int = 2 * LONGEST, window: int = 4096, seed: int = 7):
    grids = reference_mix_grids(count, seed=seed)
    refs = [("mix", index) for index in range(count)]
    tokens = {ref: clip_tokens(MODEL_5B, ClipShape(*grid, 226)) for ref, grid in zip(refs, grids)}
    return PackPlan(refs, tokens, pack_tokens, seed, window), tokens


def test_every_clip_of_an_epoch_is_in_exactly_one_pack_and_no_pack_is_over_budget():
    plan, tokens = reference_plan()
    for epoch in (0, 1):
        packs = plan.epoch_packs(epoch)
        counts = collections.Counter(ref for pack in packs for ref in pack.clips)
        assert set(counts) == set(tokens) and set(counts.values()) == {1}
        for pack in packs:
            assert pack.tokens == sum(tokens[ref] for ref in pack.clips) <= plan.pack_tokens


@pytest.mark.parametrize("budget_in_longest_clips", [2, 4])
def test_packs_are_at_least_95_percent_full_on_the_reference_mix(budget_in_longest_clips):
    plan, _ = reference_plan(pack_tokens=budget_in_longest_clips * LONGEST)
    efficiency = packing_efficiency(plan.epoch_packs(0), plan.pack_tokens)
    assert efficiency >= 0.95, f"{efficiency:.3f}"


def test_best_fit_decreasing_beats_packing_in_arrival_order():
    plan, tokens = reference_plan()
    sizes = [tokens[("mix", i)] for i in range(600)]
    arrival, room = 1, plan.pack_tokens  # next-fit in arrival order: the naive packer
    for size in sizes:
        if size > room:
            arrival, room = arrival + 1, plan.pack_tokens
        room -= size
    assert len(best_fit_decreasing(sizes, plan.pack_tokens)) < arrival


def test_steps_take_consecutive_packs_across_epochs_and_depend_only_on_seed_and_step():
    plan, _ = reference_plan(count=200)
    per_epoch = len(plan.epoch_packs(0))
    packs_per_step = 7
    stream = [pack for step in range(2 * per_epoch // packs_per_step + 1)
              for pack in plan.step_packs(step, packs_per_step)]
    assert stream[:per_epoch] == plan.epoch_packs(0)
    assert stream[per_epoch:2 * per_epoch] == plan.epoch_packs(1)
    fresh, _ = reference_plan(count=200)  # a resumed run plans from the step alone
    late = 2 * per_epoch // packs_per_step
    assert fresh.step_packs(late, packs_per_step) == plan.step_packs(late, packs_per_step)
    other_seed, _ = reference_plan(count=200, seed=8)
    assert other_seed.epoch_packs(0) != plan.epoch_packs(0)


def test_a_clip_longer_than_the_budget_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=f"raise data.pack_tokens to at least {LONGEST}"):
        reference_plan(pack_tokens=LONGEST - 1)


def test_packing_config_errors_name_the_value_and_the_fix():
    from cogvx_mega.config import load_config

    with pytest.raises(ConfigError, match="data.pack_tokens"):
        load_config("tiny", overrides=["data.packing=true"])
    with pytest.raises(ConfigError, match="a micro-batch is one pack"):
        load_config("tiny", overrides=["data.packing=true", "data.pack_tokens=128", "training.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="until_step"):
        load_config("tiny", overrides=["data.stages=[{buckets: [9x32x32]}, {buckets: [9x64x64]}]"])
    with pytest.raises(ConfigError, match="unknown stage fields"):
        load_config("tiny", overrides=["data.stages=[{until_step: 5, resolution: 256}, {}]"])


def test_a_resume_with_the_saved_pack_counts_packs_only_the_window_it_lands_in(monkeypatch):
    """The plan keeps the pack counts of the windows it passed; a checkpoint holds them (`state_dict`), and a
    plan loaded with them finds a late step by packing one window, not every earlier epoch. Without them (or with
    the state of another plan) it packs again and finds the same packs."""
    from cogvx_mega.data import packing

    plan, _ = reference_plan(count=300, window=64)
    packs_per_step = 5
    late = 3 * len(plan.epoch_packs(0)) // packs_per_step  # in the fourth epoch or so
    for step in range(late + 1):
        expected = plan.step_packs(step, packs_per_step)
    state = plan.state_dict()
    assert len(state["epoch_starts"]) >= 4
    calls = []
    real = packing.best_fit_decreasing
    monkeypatch.setattr(packing, "best_fit_decreasing", lambda sizes, budget: calls.append(1) or real(sizes, budget))
    resumed, _ = reference_plan(count=300, window=64)
    assert resumed.load_state_dict(state)
    assert resumed.step_packs(late, packs_per_step) == expected
    assert len(calls) <= 2  # the window of the step (and the next, where the step straddles two)
    calls.clear()
    replanned, _ = reference_plan(count=300, window=64)
    assert not replanned.load_state_dict({**state, "fingerprint": "another plan"})
    assert replanned.step_packs(late, packs_per_step) == expected
    assert len(calls) > 3 * plan.windows_per_epoch  # packing every earlier epoch again


def test_a_packed_run_resumes_with_its_pack_counts_and_the_uninterrupted_losses(tmp_path):
    import json

    from cogvx_mega.cli import main

    args = ["--preset", "tiny", "--device", "cpu", "data.packing=true", "data.pack_tokens=160",
            "training.micro_batch_size=1", "training.global_batch_size=2", "data.pack_window=8",
            "data.num_synthetic_clips=12"]
    assert main(["train", "--run-dir", str(tmp_path / "whole"), "--steps", "8", *args]) == 0
    assert main(["train", "--run-dir", str(tmp_path / "cut"), "--steps", "8", *args,
                 "training.save_interval=5"]) == 0
    meta = json.loads(next((tmp_path / "cut" / "checkpoints").glob("step_00000005/cogvx_checkpoint.json")).read_text())
    assert meta["data_state"]["epoch_starts"][-1] > 0  # the counts of the epochs passed are in the checkpoint
    import shutil

    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000008")
    assert main(["train", "--run-dir", str(tmp_path / "cut"), "--steps", "8", *args, "--resume", "auto"]) == 0
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("whole", "cut")}
    assert losses["cut"] == losses["whole"]
