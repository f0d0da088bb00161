"""Validation loss by timestep bin (issue 30): rows in metrics.jsonl every training.valid_every steps with
`valid_loss` and `valid_loss_by_bin` (10 bins; their mean is the overall loss), the EMA's beside them, the
same numbers after a resume, the scalars in TensorBoard's event files, and a run without data.valid refused."""
from __future__ import annotations

import json

import pytest

from cogvx_mega.cli import main

BASE = ["train", "--preset", "tiny", "--data", "synthetic", "--device", "cpu", "data.num_synthetic_clips=4",
        "data.valid=synthetic", "training.valid_every=2", "training.valid_samples=4", "training.micro_batch_size=2",
        "training.ema_decay=0.5", "training.save_interval=2", "training.tensorboard=true", "training.lr=0.01"]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("valid") / "run"
    assert main([*BASE, "--run-dir", str(run), "--steps", "4"]) == 0
    return run


def test_validation_rows_by_bin(run):
    history = rows(run)
    validated = [r for r in history if "valid_loss" in r]
    assert [r["step"] for r in validated] == [2, 4]
    for row in validated:
        for name in ("valid_loss", "valid_loss_ema"):
            assert len(row[f"{name}_by_bin"]) == 10
            assert row[name] == pytest.approx(sum(row[f"{name}_by_bin"]) / 10, rel=1e-12)
    # the bins differ (the loss depends on the timestep) and training moved the model between the two
    assert len({round(v, 6) for v in validated[0]["valid_loss_by_bin"]}) == 10
    assert validated[0]["valid_loss"] != validated[1]["valid_loss"]
    assert validated[1]["valid_loss_ema"] != validated[1]["valid_loss"]


def test_validation_is_the_same_after_a_resume(run, tmp_path):
    import shutil

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    assert main([*BASE, "--run-dir", str(resumed), "--steps", "4", "--resume", "auto"]) == 0
    expected = [r for r in rows(run) if r["step"] == 4][0]
    found = [r for r in rows(resumed) if r["step"] == 4][0]
    for name in ("valid_loss", "valid_loss_by_bin", "valid_loss_ema", "valid_loss_ema_by_bin"):
        assert found[name] == expected[name], name


def test_tensorboard_holds_the_validation_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/valid_loss", "train/valid_loss_ema", "valid_loss_by_bin/bin_00", "valid_loss_by_bin/bin_09"} <= tags
    last = [r for r in rows(run) if r["step"] == 4][0]
    assert events.Scalars("valid_loss_by_bin/bin_09")[-1].value == pytest.approx(last["valid_loss_by_bin"][9], rel=1e-6)


def test_validation_needs_a_validation_set(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--data", "synthetic", "--device", "cpu", "training.valid_every=2",
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "needs data.valid" in capsys.readouterr().err


def test_sample_videos_reach_tensorboard(tmp_path):
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cogvx_mega.data.tiny_models import make_tiny_t5, make_tiny_vae
    from cogvx_mega.vae.io import read_video

    examples = __import__("pathlib").Path(__file__).resolve().parents[2] / "examples" / "configs"
    run = tmp_path / "run"
    assert main(["train", "--config", str(examples / "tiny-samples.yaml"), "--vae", str(make_tiny_vae(tmp_path / "vae")),
                 "--text-encoder", str(make_tiny_t5(tmp_path / "t5")), "--run-dir", str(run), "--steps", "2",
                 "training.sample_every=2", "sampling.steps=2", "training.tensorboard=true"]) == 0
    samples = [r for r in rows(run) if r.get("samples")][-1]["samples"]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {f"samples/sample_{i:02d}" for i in range(len(samples))} <= set(events.Tags()["images"])
    for index, path in enumerate(samples):
        video, _ = read_video(str(run / path))
        gif = Image.open(io.BytesIO(events.Images(f"samples/sample_{index:02d}")[-1].encoded_image_string))
        assert gif.format == "GIF" and gif.n_frames == video.shape[2] and gif.size == (video.shape[4], video.shape[3])


def test_weights_and_biases_offline_gets_the_same_scalars(tmp_path, monkeypatch):
    """Offline (no network): the run's .wandb file is written, and every step's row reached W&B's log with the
    values of metrics.jsonl (what W&B stores of a logged value is W&B's business: its reader is Go, not Python)."""
    wandb = pytest.importorskip("wandb", reason="W&B is an optional dependency: pip install wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_init = wandb.init

    def recording_init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_log = run.log

        def log(values, step=None, **more):
            logged.append((step, dict(values)))
            return real_log(values, step=step, **more)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", recording_init)
    run = tmp_path / "run"
    assert main([*BASE, "--run-dir", str(run), "--steps", "2", "training.wandb_project=cogvx-test",
                 "training.wandb_mode=offline"]) == 0
    [record] = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert record.stat().st_size > 0
    assert [step for step, _ in logged] == [r["step"] for r in rows(run)] == [1, 2]
    for (_, values), row in zip(logged, rows(run)):
        assert values["train/loss"] == row["loss"] and values["train/lr"] == row["lr"]
    last = logged[-1][1]
    assert last["train/valid_loss"] == rows(run)[-1]["valid_loss"]
    assert [last[f"valid_loss_by_bin/bin_{i:02d}"] for i in range(10)] == rows(run)[-1]["valid_loss_by_bin"]
    assert (run / "wandb_run_id").is_file()
