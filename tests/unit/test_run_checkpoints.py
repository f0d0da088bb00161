"""A run's checkpoints from the command line: `--init-from`, resuming an older checkpoint (the newer line is
moved aside), a kill between the two renames of a replacement, a finished run resumed, config changes on
resume, and a run folder that already holds another run."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest
import torch

from cogvx_mega.cli import EXIT_USER_ERROR, main
from cogvx_mega.training.checkpoint import find_resume_checkpoint, list_checkpoints, step_folder

TINY = ["--preset", "tiny", "--data", "synthetic", "data.num_synthetic_clips=4", "training.micro_batch_size=2"]


def train(run_dir, *args, capsys=None):
    status = main(["train", *TINY, "--run-dir", str(run_dir), *args])
    err = capsys.readouterr().err if capsys is not None else ""
    progress = ("train:", "step ", "trained to step")  # a bar, the plain log lines and the closing line
    return status, [line for line in err.splitlines() if line.strip() and not line.startswith(progress)]


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def test_init_from_diffusers_single_file_and_sharded_checkpoints(tmp_path, capsys):
    from families import make_tiny_preset_diffusers_model

    import cogvx_mega
    from cogvx_mega.checkpoint.reader import read_transformer_checkpoint

    released = tmp_path / "released"
    make_tiny_preset_diffusers_model().save_pretrained(released / "transformer")  # a pipeline-style folder
    _, expected, _ = read_transformer_checkpoint(released)
    assert main(["convert", "diffusers-to-project", str(released), str(tmp_path / "single")]) == 0
    sources = {"diffusers": released, "single": tmp_path / "single"}
    first_losses = {}
    for name, source in sources.items():
        status, _ = train(tmp_path / name / "run", "--steps", "1", "--init-from", str(source))
        assert status == 0
        first_losses[name] = losses(tmp_path / name / "run")[1]
    # a sharded training checkpoint is an --init-from source too: its weights, step 0, a fresh optimizer
    sharded = step_folder(tmp_path / "diffusers" / "run", 1)
    status, _ = train(tmp_path / "from-sharded", "--steps", "1", "--init-from", str(sharded))
    assert status == 0 and json.loads((step_folder(tmp_path / "from-sharded", 1) / "cogvx_checkpoint.json")
                                      .read_text())["step"] == 1
    assert first_losses["diffusers"] == first_losses["single"]
    # the first step ran on the released weights: same loss as the single-process model loaded with from_pretrained
    model = cogvx_mega.from_pretrained(str(released))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_init_from_another_model_is_refused_before_writing(tmp_path, capsys):
    from families import make_tiny_preset_diffusers_model

    released = tmp_path / "released"
    make_tiny_preset_diffusers_model().save_pretrained(released)
    status, lines = train(tmp_path / "run", "--steps", "1", "--init-from", str(released), "model.num_layers=4",
                          capsys=capsys)
    assert status == EXIT_USER_ERROR and len(lines) == 1 and "num_layers" in lines[0]
    assert not (tmp_path / "run").exists()
    status, lines = train(tmp_path / "run", "--steps", "1", "--init-from", str(tmp_path / "nothing"), capsys=capsys)
    assert status == EXIT_USER_ERROR and len(lines) == 1 and "nothing" in lines[0]
    assert not (tmp_path / "run").exists()


def test_resuming_an_older_checkpoint_moves_the_newer_line_aside(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--steps", "6", "training.save_interval=2", "training.keep_checkpoints=2")[0] == 0
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000006"]
    # branch from step 4 with another learning rate, for one step: the old step 6 is another line now
    status, lines = train(run, "--steps", "5", "--resume", str(step_folder(run, 4)), "training.lr=5e-4",
                          "training.keep_checkpoints=2", capsys=capsys)
    assert status == 0
    assert any("moved" in line and "abandoned-after-step_00000004" in line for line in lines)
    kept = list_checkpoints(run)
    assert [p.name for p in kept] == ["step_00000004", "step_00000005"]
    newest = find_resume_checkpoint("auto", run)
    assert newest == step_folder(run, 5)
    assert json.loads((newest / "cogvx_checkpoint.json").read_text())["training"]["lr"] == 5e-4
    (abandoned,) = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert sorted(p.name for p in abandoned.iterdir()) == ["step_00000006"]


def _kill_between_the_renames(tmp: str, final: str) -> None:
    """Replace `final` by `tmp` and die (SIGKILL) right after the first of the two renames."""
    from cogvx_mega.checkpoint import atomic

    real = os.replace
    calls = []

    def replace(source, destination):
        real(source, destination)
        calls.append(source)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    atomic.os.replace = replace
    atomic.swap_into_place(Path(tmp), Path(final))


def test_a_kill_between_the_two_renames_is_repaired_on_the_next_start(tmp_path, capsys):
    import shutil

    run, straight = tmp_path / "run", tmp_path / "straight"
    assert train(straight, "--steps", "3")[0] == 0
    assert train(run, "--steps", "2")[0] == 0
    checkpoint = step_folder(run, 2)
    replacement = checkpoint.parent / ".step_00000002.tmp"
    shutil.copytree(checkpoint, replacement)  # a complete new copy of the same step, being put in place
    child = mp.get_context("fork").Process(target=_kill_between_the_renames, args=(str(replacement), str(checkpoint)))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert not checkpoint.exists() and list_checkpoints(run) == []  # the step is only under its hidden twin now
    assert train(run, "--steps", "3", "--resume", "auto")[0] == 0
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000003"]
    assert losses(run)[3] == pytest.approx(losses(straight)[3], rel=1e-6)
    assert not [p for p in checkpoint.parent.iterdir() if ".old-" in p.name]


def test_a_finished_run_resumed_neither_trains_nor_saves(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--steps", "2")[0] == 0
    meta = step_folder(run, 2) / "cogvx_checkpoint.json"
    before = (os.stat(meta).st_ino, os.stat(meta).st_mtime_ns, (run / "metrics.jsonl").read_text())
    status, lines = train(run, "--steps", "2", "--resume", "auto", capsys=capsys)
    assert status == 0 and any("nothing to train" in line for line in lines)
    assert (os.stat(meta).st_ino, os.stat(meta).st_mtime_ns, (run / "metrics.jsonl").read_text()) == before


def test_resume_reports_safe_changes_and_refuses_the_others(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--steps", "2")[0] == 0
    status, lines = train(run, "--steps", "3", "--resume", "auto", "training.lr=5e-4", capsys=capsys)
    assert status == 0
    changed = [line for line in lines if line.startswith("resume changes")]
    assert len(changed) == 1 and "training.lr: 0.002 -> 0.0005" in changed[0] and "training.steps: 2 -> 3" in changed[0]
    for args, needle in [(["--seed", "7"], "training.seed"), (["training.global_batch_size=4"], "global batch: 2 -> 4"),
                         (["diffusion.snr_shift_scale=3.0"], "diffusion.snr_shift_scale"),
                         (["data.num_frames=5"], "data.num_frames")]:
        before = sorted(p.name for p in (run / "checkpoints").iterdir())
        status, lines = train(run, "--steps", "4", "--resume", "auto", *args, capsys=capsys)
        assert status == EXIT_USER_ERROR and len(lines) == 1 and needle in lines[0] and "--init-from" in lines[0], args
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_run_folder_with_checkpoints_needs_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, "--steps", "1", capsys=capsys)[0] == 0
    before = (run / "metrics.jsonl").read_text()
    status, lines = train(run, "--steps", "2", capsys=capsys)
    assert status == EXIT_USER_ERROR and len(lines) == 1 and "--resume auto" in lines[0]
    assert (run / "metrics.jsonl").read_text() == before
    status, lines = train(run, "--steps", "2", "--resume", str(step_folder(run, 1).parent / "nope"), capsys=capsys)
    assert status == EXIT_USER_ERROR and "--resume" in lines[0]


def test_a_checkpoint_older_than_a_config_field_resumes_at_its_default():
    """A checkpoint written before data.packing existed recorded no such field: it ran with the default."""
    import dataclasses

    from cogvx_mega.config import ConfigError, load_config
    from cogvx_mega.training.checkpoint import check_resume_config

    config = load_config("tiny")
    meta = {section: dataclasses.asdict(getattr(config, section)) for section in ("training", "data", "diffusion")}
    for name in ("packing", "pack_tokens", "pack_window", "stages"):
        del meta["data"][name]
    assert check_resume_config(meta, config, config.training.global_batch(1), "ckpt") == []
    packed = load_config("tiny", overrides=["data.packing=true", "data.pack_tokens=128", "training.micro_batch_size=1"])
    with pytest.raises(ConfigError, match=r"data\.pack_tokens: None -> 128"):
        check_resume_config(meta, packed, packed.training.global_batch(1), "ckpt")


def test_a_resume_may_not_switch_between_fp32_and_bf16_parameters():
    import dataclasses

    from cogvx_mega.config import ConfigError, load_config
    from cogvx_mega.training.checkpoint import check_resume_config

    fp32 = load_config("tiny", overrides=["training.device=cuda", "training.bf16=true",
                                          "training.mixed_precision=autocast"])
    meta = {section: dataclasses.asdict(getattr(fp32, section)) for section in ("training", "data", "diffusion")}
    bf16 = load_config("tiny", overrides=["training.device=cuda", "training.bf16=true"])  # auto: bf16_params
    with pytest.raises(ConfigError, match="precision: autocast -> bf16_params"):
        check_resume_config(meta, bf16, bf16.training.global_batch(1), "ckpt")
    no_bf16 = load_config("tiny", overrides=["training.device=cuda", "training.bf16=false"])
    changes = check_resume_config(meta, no_bf16, no_bf16.training.global_batch(1), "ckpt")
    assert "training.bf16: True -> False" in changes  # fp32 weights either way: allowed
