"""Verified checkpoints: every file's size and CRC32C are recorded at save; `cogvx checkpoint verify` names a
damaged file (exit 1); `--resume auto` sets a damaged checkpoint aside with one warning line and resumes from
the one before, continuing exactly the uninterrupted run; an explicit `--resume` of a damaged one is one
clear error (exit 2)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cogvx_mega.cli import main

# a constant LR, so a 4-step run resumed to 6 steps is the 6-step run
TRAIN = ["train", "--preset", "tiny", "--device", "cpu", "data.num_synthetic_clips=8", "training.micro_batch_size=2",
         "training.lr=2e-3", "training.min_lr=2e-3", "training.warmup_steps=0", "training.save_interval=2",
         "training.keep_checkpoints=3"]


def losses_by_step(run: Path) -> dict[int, float]:
    """The loss of each step (a step trained again after a resume must give the same loss)."""
    seen: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        metrics = json.loads(line)
        assert seen.setdefault(metrics["step"], metrics["loss"]) == metrics["loss"], metrics["step"]
    return seen


def weights(checkpoint: Path) -> dict:
    from cogvx_mega.checkpoint.reader import read_transformer_checkpoint

    return read_transformer_checkpoint(checkpoint)[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    assert main([*TRAIN, "--run-dir", str(root / "straight"), "--steps", "6"]) == 0
    assert main([*TRAIN, "--run-dir", str(root / "four"), "--steps", "4"]) == 0
    return root


def shard(folder: Path) -> Path:
    return sorted(folder.glob("__0_*.distcp"))[0]


def truncate(folder: Path) -> str:
    path = shard(folder)
    path.write_bytes(path.read_bytes()[:1000])
    return path.name


def remove(folder: Path) -> str:
    path = shard(folder)
    path.unlink()
    return path.name


def flip_a_byte(folder: Path) -> str:
    path = shard(folder)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return path.name


def garbage_metadata(folder: Path) -> str:
    (folder / "cogvx_checkpoint.json").write_text('{"format": "cogvx-mega/torch-dist-v1", "step": 4, ')
    return "cogvx_checkpoint.json"


def empty_metadata(folder: Path) -> str:
    (folder / "cogvx_checkpoint.json").write_text("")
    return "cogvx_checkpoint.json"


DAMAGE = [truncate, remove, flip_a_byte, garbage_metadata, empty_metadata]


def test_every_file_is_recorded_and_an_intact_checkpoint_verifies(runs, capsys):
    folder = runs / "straight" / "checkpoints" / "step_00000006"
    meta = json.loads((folder / "cogvx_checkpoint.json").read_text())
    on_disk = {p.name for p in folder.iterdir() if p.name != "cogvx_checkpoint.json"}
    assert set(meta["files"]) == on_disk
    for name, record in meta["files"].items():
        assert record["size"] == (folder / name).stat().st_size
    assert main(["checkpoint", "verify", str(folder)]) == 0
    assert ": ok:" in capsys.readouterr().out
    assert main(["checkpoint", "list", str(runs / "straight")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["step_00000002", "step_00000004", "step_00000006"]
    assert all(line.split()[2] == "TP1xPP1xCP1xDP1" and line.rstrip().endswith("sizes ok") for line in lines[1:-1])


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
def test_resume_auto_falls_back_past_a_damaged_checkpoint(runs, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(runs / "four", run)
    newest = run / "checkpoints" / "step_00000004"
    bad_file = damage(newest)
    capsys.readouterr()
    assert main(["checkpoint", "verify", str(newest)]) == 1
    out = capsys.readouterr().out
    assert "damaged" in out and bad_file in out, out
    assert main(["checkpoint", "list", str(run), "--checksums"]) == 0
    assert f"damaged: {bad_file}" in capsys.readouterr().out
    assert main(["checkpoint", "list", str(run)]) == 0  # sizes alone see all but a changed byte
    assert (f"damaged: {bad_file}" in capsys.readouterr().out) == (damage is not flip_a_byte)

    assert main([*TRAIN, "--run-dir", str(run), "--steps", "6", "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and bad_file in warnings[0] and "Traceback" not in err, err
    assert "resumed from" in err and "step_00000002" in err
    aside = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("damaged-step_00000004")]
    assert len(aside) == 1  # moved, not deleted
    straight = losses_by_step(runs / "straight")
    resumed = losses_by_step(run)
    assert resumed == straight  # steps 3-6 trained again from step 2 equal the uninterrupted run exactly
    final, reference = weights(run / "checkpoints" / "step_00000006"), weights(runs / "straight" / "checkpoints" /
                                                                              "step_00000006")
    assert all(torch.equal(final[key], reference[key]) for key in reference)


def test_an_explicit_resume_of_a_damaged_checkpoint_is_one_error(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "four", run)
    bad_file = flip_a_byte(run / "checkpoints" / "step_00000004")
    code = main([*TRAIN, "--run-dir", str(run), "--steps", "6", "--resume", str(run / "checkpoints" /
                                                                              "step_00000004")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and bad_file in err[0] and "damaged" in err[0], err
    assert (run / "checkpoints" / "step_00000004").is_dir()  # an explicit choice is not moved
