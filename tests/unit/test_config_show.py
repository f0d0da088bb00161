"""`cogvx config show`: the YAML it prints is the resolved config (loading it back gives the same Config), for a
preset with overrides and for a run dir with overrides on top; a folder without a run's config is one line."""
from __future__ import annotations

import yaml

from cogvx_mega.cli import EXIT_USER_ERROR, main
from cogvx_mega.config import load_config


def shown(capsys, *args) -> dict:
    assert main(["config", "show", *args]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_show_prints_the_resolved_config_of_a_preset_and_overrides(tmp_path, capsys):
    values = shown(capsys, "--preset", "tiny", "training.lr=3e-4", "data.num_frames=5")
    expected = load_config("tiny", overrides=["training.lr=3e-4", "data.num_frames=5"])
    assert values == expected.to_dict()
    assert values["training"]["lr"] == 3e-4 and values["training"]["save_every_minutes"] == 30.0  # defaults too
    (tmp_path / "shown.yaml").write_text(yaml.safe_dump(values))
    assert load_config(config_file=str(tmp_path / "shown.yaml")) == expected  # it loads back as the same config


def test_show_of_a_run_dir_is_the_config_it_trained_with(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", "synthetic", "data.num_synthetic_clips=2", "--device", "cpu",
                 "--steps", "1", "--run-dir", str(run), "training.lr=7e-4"]) == 0
    capsys.readouterr()
    values = shown(capsys, "--run-dir", str(run))
    assert values["training"]["lr"] == 7e-4 and values["training"]["run_dir"] == str(run)
    assert shown(capsys, "--run-dir", str(run), "training.steps=9")["training"]["steps"] == 9
    assert main(["config", "show", "--run-dir", str(tmp_path)]) == EXIT_USER_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "holds no config.yaml" in lines[0]
