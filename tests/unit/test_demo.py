"""`make demo` (the README's main job) end to end at a few steps: real clips -> manifest -> latent cache ->
training -> diffusers folder that diffusers reloads with our output -> loss plot."""
from __future__ import annotations

import json

import pytest


@pytest.mark.timeout(600)
def test_demo_runs_the_whole_data_path(tmp_path):
    from cogvx_mega.demo import DEMO_CLIPS, run_demo

    run = tmp_path / "demo"
    summary = run_demo(run_dir=str(run), steps=8)
    assert summary["clips"] == DEMO_CLIPS and summary["steps"] == 8
    assert summary["diffusers_max_abs_diff"] is not None and summary["diffusers_max_abs_diff"] <= 1e-5
    for name in ("manifest.jsonl", "cache.zarr", "metrics.jsonl", "config.yaml", "loss.png", "summary.json",
                 "diffusers/config.json", "checkpoints/step_00000008/cogvx_checkpoint.json"):
        assert (run / name).exists(), name
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
