"""Telemetry and the skip guard. Every logged step has model TFLOP/s (the FLOP formula counts 6 x the layers'
matrix parameters per token, plus attention), the data loader's wait and host memory, in metrics.jsonl and as
TensorBoard scalars; NVML readings appear when NVML answers (a stand-in NVML here: no GPU) and are left out
quietly when it does not. A step with a NaN loss or a loss spike is skipped (no update: the weights and the
optimizer state stay as they were), logged, and the run continues; K skipped steps in a row stop it after a
checkpoint, with one line and exit status 3."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from cogvx_mega.config import load_config
from cogvx_mega.data.latent_dataset import synthetic_dataset_for
from cogvx_mega.model.transformer import build_model_chunks
from cogvx_mega.parallel.state import initialize_parallel
from cogvx_mega.training import TrainingDiverged
from cogvx_mega.training.trainer import Trainer

TELEMETRY = {"tflops_per_gpu", "data_wait_s", "host_rss_gib"}


def tiny_config(tmp_path, *overrides):
    return load_config("tiny", overrides=[f"training.run_dir='{tmp_path}'", "data.num_synthetic_clips=8",
                                          "training.micro_batch_size=2", "training.warmup_steps=0", *overrides])


class Corrupted:
    """The synthetic data with some steps' latents replaced: NaN, or scaled (a loss spike)."""

    def __init__(self, dataset, steps: dict):
        self.dataset, self.steps = dataset, steps

    def step_batch(self, step, slots, global_batch, seed):
        batch = dict(self.dataset.step_batch(step, slots, global_batch, seed))
        if step in self.steps:
            batch["latents"] = batch["latents"] * self.steps[step]
        return batch


def make_trainer(config, corrupt: dict):
    dims = initialize_parallel(config.parallel, device="cpu", seed=0)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu", seed=0)
    return Trainer(config, dims, chunks, Corrupted(synthetic_dataset_for(config), corrupt))


def flat_parameters(trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in trainer.model.parameters()])


def adam_steps(trainer) -> list:
    return sorted({int(state["step"]) for state in trainer.optimizer.optimizer.state.values() if "step" in state})


def test_metrics_and_tensorboard_carry_the_telemetry(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cogvx_mega.cli import main

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", "synthetic", "--steps", "3", "--device", "cpu", "--run-dir",
                 str(run), "training.micro_batch_size=2", "data.num_synthetic_clips=4"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert TELEMETRY <= set(row) and not any(key.startswith("gpu_") for key in row), row
        assert row["tflops_per_gpu"] > 0 and row["data_wait_s"] >= 0 and row["host_rss_gib"] > 0
        assert "mfu" not in row  # no datasheet peak on a CPU
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for name in ("loss", "grad_norm", "lr", "tflops_per_gpu", "data_wait_s"):
        scalars = events.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([row[name] for row in rows], rel=1e-6)


def test_the_flop_formula_is_six_flops_per_matrix_parameter_and_token_plus_attention():
    from cogvx_mega.model.flops import peak_tflops_of, training_flops
    from cogvx_mega.model.transformer import build_model

    config = load_config("tiny")
    model = build_model(config.model)
    matrices = sum(p.numel() for name, p in model.named_parameters()
                   if name.startswith("decoder.layers.") and p.dim() == 2 and "adaln" not in name
                   and "modulation" not in name)
    tokens = 64
    d, layers = config.model.hidden_size, config.model.num_layers
    attention = 3 * layers * 4 * tokens * tokens * d
    assert training_flops(config.model, [tokens]) - attention == pytest.approx(6 * matrices * tokens, rel=1e-9)
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert peak_tflops_of("NVIDIA H100 PCIe", fp8=True) == pytest.approx(2 * 756.0)
    assert peak_tflops_of("Some CPU") is None


def test_nvml_readings_are_reported_and_absent_nvml_is_quiet(monkeypatch):
    from cogvx_mega.training.telemetry import GpuMonitor

    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert GpuMonitor(torch.device("cuda", 0)).read() == {}

    fake = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0, nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: ("handle", index),
        nvmlDeviceGetUtilizationRates=lambda handle: types.SimpleNamespace(gpu=87),
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=40 * 2**30),
        nvmlDeviceGetPowerUsage=lambda handle: 512_000,  # milliwatts
        nvmlDeviceGetTemperature=lambda handle, sensor: 61)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace())
    assert GpuMonitor(torch.device("cuda", 0)).read() == {"gpu_util_pct": 87.0, "gpu_mem_used_gib": 40.0,
                                                          "gpu_power_w": 512.0, "gpu_temp_c": 61.0}


def test_a_nan_step_is_skipped_without_an_update_and_the_run_continues(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path, "training.steps=4"), corrupt={1: float("nan")})
    snapshots, adam = [], []
    trainer.fit(on_step=lambda m: (snapshots.append(flat_parameters(trainer)), adam.append(adam_steps(trainer))))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False, True, False, False]
    assert "non-finite loss" in rows[1]["skip_reason"] and rows[1]["grad_norm"] is None
    assert torch.equal(snapshots[1], snapshots[0]) and adam[1] == adam[0] == [1]
    assert not torch.equal(snapshots[2], snapshots[1]) and adam[3] == [3]
    assert all(torch.isfinite(s).all() for s in snapshots)


def test_a_loss_spike_is_skipped(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path, "training.steps=7", "training.loss_spike_factor=3.0"),
                           corrupt={6: 30.0})
    rows = trainer.fit()
    assert [r.get("skipped", False) for r in rows] == [False] * 6 + [True]
    assert "loss spike" in rows[6]["skip_reason"]


def test_k_skipped_steps_in_a_row_stop_the_run_after_a_checkpoint(tmp_path, capsys, monkeypatch):
    trainer = make_trainer(tiny_config(tmp_path, "training.steps=8", "training.max_skipped_steps=2"),
                           corrupt={2: float("nan"), 3: float("nan")})
    with pytest.raises(TrainingDiverged, match="2 steps in a row were skipped"):
        trainer.fit()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000004"]

    from cogvx_mega import cli
    from cogvx_mega.run import training

    def diverge(*args, **kwargs):
        raise TrainingDiverged("3 steps in a row were skipped")

    monkeypatch.setattr(training, "run_training", diverge)
    capsys.readouterr()  # the warnings of the run above
    assert cli.main(["train", "--preset", "tiny", "--device", "cpu"]) == cli.EXIT_DIVERGED == 3
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["cogvx: error: 3 steps in a row were skipped"]
