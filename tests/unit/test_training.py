"""Training loop: overfitting, checkpoints, resume and metrics (single process, CPU)."""
from __future__ import annotations

import json

import pytest
import torch

import cogvx_mega
from cogvx_mega.config import load_config
from cogvx_mega.data.latent_dataset import synthetic_dataset_for
from cogvx_mega.model.transformer import build_model_chunks
from cogvx_mega.parallel.state import initialize_parallel
from cogvx_mega.training.trainer import Trainer


def tiny_config(tmp_path, *overrides):
    return load_config("tiny", overrides=[f"training.run_dir='{tmp_path}'", "data.num_synthetic_clips=8", *overrides])


def make_trainer(config, seed=0):
    dims = initialize_parallel(config.parallel, device="cpu", seed=seed)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu", seed=seed)
    return Trainer(config, dims, chunks, synthetic_dataset_for(config))


def test_tiny_model_overfits_one_batch(tmp_path):
    config = tiny_config(tmp_path, "training.steps=150", "training.lr=3e-3", "training.warmup_steps=10",
                         "training.micro_batch_size=2",
                         "diffusion.text_dropout=0.0")
    trainer = make_trainer(config)
    batch = {"latents": trainer.dataset.latents[:2], "text_embeds": trainer.dataset.text_embeds[:2],
             "noise": torch.randn(2, *trainer.dataset.latents.shape[1:], generator=torch.Generator().manual_seed(0)),
             "timesteps": torch.tensor([300, 700])}
    losses = [trainer.train_step(batch)["loss"] for _ in range(config.training.steps)]
    assert losses[-1] * 10 <= losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = make_trainer(tiny_config(tmp_path / "a", "training.steps=6"))
    uninterrupted = [m["loss"] for m in straight.fit()]

    first = make_trainer(tiny_config(tmp_path / "b", "training.steps=3"))
    first.fit()
    resumed = make_trainer(tiny_config(tmp_path / "b", "training.steps=6"), seed=99)  # other init: must be replaced
    resumed.load(str(tmp_path / "b" / "checkpoints" / "step_00000003"))
    assert resumed.step == 3
    continued = [m["loss"] for m in resumed.fit()]
    assert continued == pytest.approx(uninterrupted[3:], rel=1e-6, abs=0)


def test_metrics_and_checkpoint_retention(tmp_path):
    config = tiny_config(tmp_path, "training.steps=5", "training.save_interval=1", "training.keep_checkpoints=2")
    make_trainer(config).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for row in rows:
        assert set(row) == {"step", "loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "tflops_per_gpu",
                            "data_wait_s", "host_rss_gib"}
        assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * 64)  # 16 text + 3*4*4 video tokens
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000005"]


def test_training_checkpoint_loads_with_from_pretrained(tmp_path):
    config = tiny_config(tmp_path, "training.steps=2")
    trainer = make_trainer(config)
    trainer.fit()
    loaded = cogvx_mega.from_pretrained(str(tmp_path / "checkpoints" / "step_00000002"))
    latents = torch.randn(1, 3, 4, 8, 8)
    text = torch.randn(1, 16, 32)
    with torch.no_grad():
        assert torch.equal(loaded(latents, text, torch.tensor([10])),
                           trainer.model.eval()(latents, text, torch.tensor([10])))


def test_text_dropout_zeroes_whole_samples(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path, "diffusion.text_dropout=0.5", "training.micro_batch_size=64"))
    masks = torch.stack([trainer.step_randomness(step, range(64), (1,))["text_drop_mask"] for step in range(4)])
    assert 0.35 < masks.float().mean().item() < 0.65


def test_the_python_api_trains_as_the_cli_does(tmp_path):
    """`cogvx_mega.train(config)` and `cogvx train` share one setup (run/training.py): the same losses, the same
    checkpoint, and a resume through the API continues the CLI's run."""
    from cogvx_mega.cli import main

    overrides = ["training.steps=3", "training.device=cpu", "data.num_synthetic_clips=8"]
    assert main(["train", "--preset", "tiny", "--run-dir", str(tmp_path / "cli"), *overrides]) == 0
    cli_losses = [json.loads(line)["loss"] for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    history = cogvx_mega.train(tiny_config(tmp_path / "api", *overrides))
    assert [row["loss"] for row in history] == cli_losses
    assert (tmp_path / "api" / "checkpoints" / "step_00000003").is_dir()
    more = cogvx_mega.train(tiny_config(tmp_path / "cli", "training.steps=4", "training.device=cpu",
                                        "data.num_synthetic_clips=8"), resume="auto")
    assert [row["step"] for row in more] == [4]
