"""Every example config loads and dry-runs; the 8 x H100 example fits 80 GB by the arithmetic in its own
comment (the same sums `--dry-run` prints), and the tiny example trains."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from cogvx_mega.cli import main
from cogvx_mega.config import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


@pytest.mark.parametrize("name, world, extra", [
    ("cogvideox-5b-8xh100.yaml", 8, []), ("tiny.yaml", 1, []), ("tiny-videos.yaml", 1, []),
    ("tiny-packing.yaml", 1, []), ("tiny-samples.yaml", 1, ["--vae", "VAE", "--text-encoder", "T5"]),
    ("tiny-lora.yaml", 1, []), ("tiny-i2v.yaml", 1, []), ("tiny-filters.yaml", 1, []), ("tiny-images.yaml", 1, []),
    ("tiny-ema-valid.yaml", 1, ["--vae", "VAE", "--text-encoder", "T5"])])
def test_example_dry_runs(name, world, extra, capsys):
    assert main(["train", "--config", str(EXAMPLES / name), "--dry-run", "--world-size", str(world), *extra]) == 0
    assert "memory per GPU" in capsys.readouterr().out


def test_the_8xh100_example_fits_by_its_own_arithmetic():
    from cogvx_mega.tools.plan import estimate_memory

    file = EXAMPLES / "cogvideox-5b-8xh100.yaml"
    config = load_config(config_file=str(file))
    estimate = estimate_memory(config, world_size=8)
    comment = file.read_text()
    assert f"{estimate.parameters:,} parameters per GPU" in comment
    stated_total = float(re.search(r"total about ([\d.]+) GB of 80 GB", comment).group(1))
    assert stated_total == pytest.approx(estimate.total / 1e9, abs=0.05)
    assert estimate.total < 80e9 * 0.8  # a fifth left for workspaces, the allocator and fragmentation
    for figure in (estimate.weights + estimate.gradients, estimate.optimizer, estimate.compute_copies):
        assert f"= {figure / 1e9:.1f} GB" in comment.replace("=  ", "= ")


def test_the_tiny_example_trains(tmp_path):
    assert main(["train", "--config", str(EXAMPLES / "tiny.yaml"), "--run-dir", str(tmp_path), "--steps", "2",
                 "data.num_synthetic_clips=4"]) == 0
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()


def test_the_packing_example_trains_through_its_stage_switch(tmp_path):
    import json

    config = load_config(config_file=str(EXAMPLES / "tiny-packing.yaml"))
    switch = config.data.stages[0]["until_step"]
    assert main(["train", "--config", str(EXAMPLES / "tiny-packing.yaml"), "--run-dir", str(tmp_path),
                 "--steps", str(switch + 2)]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == [0] * switch + [1, 1]
    for m in metrics:
        assert 0.5 < m["packing_efficiency"] <= 1.0, m


def test_the_samples_example_writes_a_video_per_prompt(tmp_path):
    import json

    from cogvx_mega.data.tiny_models import make_tiny_t5, make_tiny_vae

    vae = make_tiny_vae(tmp_path / "vae")
    t5 = make_tiny_t5(tmp_path / "t5")
    run = tmp_path / "run"
    assert main(["train", "--config", str(EXAMPLES / "tiny-samples.yaml"), "--vae", str(vae), "--text-encoder",
                 str(t5), "--run-dir", str(run), "--steps", "2", "training.sample_every=2",
                 "sampling.steps=2"]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["samples"] == ["samples/step_00000002/sample_00.mp4", "samples/step_00000002/sample_01.mp4"]
    assert all((run / name).stat().st_size > 0 for name in last["samples"])


def test_the_slurm_example_dry_runs_on_the_5b_example(tmp_path):
    import os
    import subprocess
    import sys

    root = EXAMPLES.parents[1]
    cogvx = f"{sys.executable} -m cogvx_mega.cli"
    result = subprocess.run(["bash", str(root / "examples" / "launch-slurm.sh"), "cache.zarr", str(tmp_path / "run"),
                             "--dry-run"], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "COGVX": cogvx})
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=2" in result.stdout and "#SBATCH --gpus-per-node=8" in result.stdout
    assert "--config examples/configs/cogvideox-5b-8xh100.yaml" in result.stdout
    assert "training.hang_timeout_s=1200 training.straggler_factor=1.5" in result.stdout  # resolved and checked
    assert not (tmp_path / "run").exists()


def test_the_scaling_example_plans(capsys):
    assert main(["scaling", "plan", str(EXAMPLES.parent / "scaling" / "tiny-sweep.yaml")]) == 0
    assert "9 runs" in capsys.readouterr().out


def test_the_gpu_suite_is_valid_bash_and_names_scripts_that_exist():
    import subprocess

    root = EXAMPLES.parents[1]
    suite = root / "benchmarks" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(suite)]).returncode == 0
    scripts = set(re.findall(r"(benchmarks/\w+\.py|tests/gpu)", suite.read_text()))
    assert scripts and all((root / script).exists() for script in scripts), scripts


def test_the_i2v_example_trains(tmp_path):
    assert main(["train", "--config", str(EXAMPLES / "tiny-i2v.yaml"), "--run-dir", str(tmp_path), "--steps", "2"]) == 0
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()


def test_the_lora_example_trains_and_exports_for_diffusers(tmp_path):
    from families import make_tiny_preset_diffusers_model
    from safetensors import safe_open

    make_tiny_preset_diffusers_model().save_pretrained(tmp_path / "base")
    assert main(["train", "--config", str(EXAMPLES / "tiny-lora.yaml"), "--init-from", str(tmp_path / "base"),
                 "--run-dir", str(tmp_path / "run"), "--steps", "2"]) == 0
    assert main(["export", "lora", "--ckpt", str(tmp_path / "run" / "checkpoints" / "step_00000002"), "--out",
                 str(tmp_path / "lora")]) == 0
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "transformer.transformer_blocks.7.attn1.to_v.lora_B.weight" in keys and len(keys) == 8 * 6 * 2


def test_the_ema_and_validation_example_trains_and_reports(tmp_path, capsys):
    import json

    from cogvx_mega.data.tiny_models import make_tiny_t5, make_tiny_vae

    run = tmp_path / "run"
    assert main(["train", "--config", str(EXAMPLES / "tiny-ema-valid.yaml"), "--vae", str(make_tiny_vae(tmp_path / "vae")),
                 "--text-encoder", str(make_tiny_t5(tmp_path / "t5")), "--run-dir", str(run), "--steps", "10"]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(last["valid_loss_by_bin"]) == 10 and "valid_loss_ema" in last and last["samples"]
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "<video" in page and "900-999" in page and "<polyline" in page
