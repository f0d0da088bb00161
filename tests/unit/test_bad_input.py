"""Bad input: one clear error line naming the value and the fix, exit status 2, nothing written."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from cogvx_mega.cli import EXIT_USER_ERROR, main
from cogvx_mega.config import ConfigError, load_config


@pytest.mark.parametrize("preset, overrides, field, hint", [
    ("tiny", ["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size", "num_attention_heads=4"),
    ("tiny", ["data.num_frames=10"], "data.num_frames", "1+4k"),
    ("tiny", ["model.sample_frames=8"], "model.sample_frames", "1+4k"),
    ("tiny", ["data.height=72"], "data.height", "patch_size=2"),
    ("tiny", ["model.sample_width=9"], "model.sample_width", "patch_size=2"),
    ("nonexistent-model", [], "preset", "cogvideox-5b"),
    ("tiny", ["model.positional_embedding=alibi"], "model.positional_embedding", "rope"),
    ("tiny", ["training.micro_batch_size=0"], "training.micro_batch_size", "positive"),
    ("tiny", ["model.num_heads=4"], "model.num_heads", "unknown field"),
    ("tiny", ["training.lr=fast"], "training.lr", "number"),
    ("cogvideox1.5-5b", ["data.num_frames=73"], "data.num_frames", "patch_size_t=2"),
    ("tiny", ["parallel.pipeline_model_parallel_size=3"], "parallel.pipeline_model_parallel_size", "num_layers=8"),
    ("tiny", ["training.device=cuda", "model.backend=te", "parallel.context_parallel_size=4",
              "parallel.context_parallel_attention=a2a+p2p"], "parallel.hierarchical_context_parallel_sizes", "[2, 2]"),
    ("tiny", ["parallel.hierarchical_context_parallel_sizes=[2, 2]"], "parallel.hierarchical_context_parallel_sizes",
     "a2a+p2p"),
    ("tiny", ["training.straggler_factor=1"], "training.straggler_factor", "above 1"),
    ("tiny", ["training.straggler_factor=0.5"], "training.straggler_factor", "above 1"),
    ("tiny", ["training.hang_timeout_s=-5"], "training.hang_timeout_s", "0 / null for no watchdog"),
])
def test_invalid_config_values_name_field_and_fix(preset, overrides, field, hint):
    with pytest.raises(ConfigError) as error:
        load_config(preset, overrides=overrides)
    assert error.value.field_name == field
    assert hint in str(error.value)


def test_config_file_values_and_overrides(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"preset": "tiny", "model": {"num_layers": 2},
                                           "training": {"lr": 5.0e-4}}))
    config = load_config(config_file=str(config_file), overrides=["training.lr=1e-3"])
    assert config.preset == "tiny" and config.model.num_layers == 2 and config.training.lr == 1e-3
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('preset = "cogvideox-5b"\n[parallel]\ntensor_model_parallel_size = 4\n')
    assert load_config(config_file=str(toml_file)).parallel.tensor_model_parallel_size == 4


def run_cli(args, capsys):
    status = main(args)
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args, needle", [
    (["train", "--preset", "tiny", "--tp", "3"], "tensor_model_parallel_size=3"),
    (["train", "--preset", "tiny", "data.num_frames=10"], "1+4k"),
    (["train", "--preset", "tiny", "data.height=72"], "patch_size"),
    (["train", "--preset", "no-such-preset"], "unknown preset"),
    (["train", "--preset", "tiny", "--resume", "/no/such/checkpoint"], "--resume"),
    (["train", "--preset", "tiny", "--data", "/no/such/folder"], "/no/such/folder"),
    (["train", "--preset", "tiny", "--tp", "4", "--cp", "2"], "Ulysses"),
    (["train", "--preset", "tiny", "--tp", "2", "--dry-run", "--world-size", "3"], "not divisible by TPxPPxCP=2"),
    (["train", "--preset", "tiny", "parallel.use_distributed_optimizer=false",
      "parallel.overlap_param_gather=true"], "use_distributed_optimizer"),
    (["train", "--preset", "tiny", "training.hang_timeout_s=-1"], "training.hang_timeout_s=-1"),
])
def test_train_rejects_bad_input_before_writing(args, needle, tmp_path, capsys):
    run_dir = tmp_path / "run"
    status, lines = run_cli([*args, "--run-dir", str(run_dir), "--steps", "1"], capsys)
    assert status == EXIT_USER_ERROR
    assert len(lines) == 1 and lines[0].startswith("cogvx: error:") and needle in lines[0]
    assert not run_dir.exists()


def test_convert_rejects_missing_and_wrong_family(tmp_path, capsys):
    from families import make_diffusers_model
    from test_parity_diffusers import sat_state_from_diffusers
    import torch

    status, lines = run_cli(["convert", "project-to-diffusers", str(tmp_path / "missing"), str(tmp_path / "out")],
                            capsys)
    assert status == EXIT_USER_ERROR and "missing" in lines[0] and len(lines) == 1

    # A diffusers folder fed to the project reader
    diffusers_dir = tmp_path / "diffusers"
    make_diffusers_model("rope-5b").save_pretrained(diffusers_dir)
    status, lines = run_cli(["convert", "project-to-diffusers", str(diffusers_dir), str(tmp_path / "out")], capsys)
    assert status == EXIT_USER_ERROR and "cogvx_checkpoint.json" in lines[0]

    # A SAT checkpoint of the 2B (sin-cos) family converted as the 1.5 family (Linear patches, other shapes)
    sat_file = tmp_path / "sat.pt"
    torch.save({"module": sat_state_from_diffusers(make_diffusers_model("sincos-2b"))}, sat_file)
    config_file = tmp_path / "family.yaml"
    config_file.write_text(yaml.safe_dump({"model": {"num_layers": 2, "num_attention_heads": 2,
                                                     "attention_head_dim": 16, "in_channels": 4, "out_channels": 4,
                                                     "time_embed_dim": 24, "text_embed_dim": 12,
                                                     "max_text_seq_length": 5, "sample_height": 8,
                                                     "sample_width": 12, "sample_frames": 9}}))
    status, lines = run_cli(["convert", "sat-to-project", str(sat_file), str(tmp_path / "out"), "--preset",
                             "cogvideox1.5-5b", "--config", str(config_file), "data.height=64", "data.width=96",
                             "data.num_frames=13"], capsys)
    assert status == EXIT_USER_ERROR and len(lines) == 1 and "shape" in lines[0]
    # and the right family converts
    status, _ = run_cli(["convert", "sat-to-project", str(sat_file), str(tmp_path / "good"), "--preset",
                         "cogvideox-2b", "--config", str(config_file), "data.height=64", "data.width=96"], capsys)
    assert status == 0
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_console_script_exit_status(tmp_path):
    """The installed `cogvx` entry point exits non-zero with one error line."""
    result = subprocess.run([sys.executable, "-m", "cogvx_mega.cli", "train", "--preset", "tiny",
                             "data.num_frames=10", "--run-dir", str(tmp_path / "r")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.strip().splitlines()[-1].startswith("cogvx: error: data.num_frames=10")
    assert not (tmp_path / "r").exists()


def test_from_pretrained_missing_path_is_a_clear_error(tmp_path):
    import cogvx_mega

    with pytest.raises(ConfigError, match="no such file or folder"):
        cogvx_mega.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="config.json"):
        cogvx_mega.from_pretrained(str(tmp_path / "empty"))


def test_resume_from_another_model_is_refused_before_writing(tmp_path, capsys):
    status, _ = run_cli(["train", "--preset", "tiny", "--run-dir", str(tmp_path / "a"), "--steps", "1",
                         "data.num_synthetic_clips=4"], capsys)
    assert status == 0
    checkpoint = tmp_path / "a" / "checkpoints" / "step_00000001"
    status, lines = run_cli(["train", "--preset", "tiny", "model.num_layers=4", "--run-dir", str(tmp_path / "b"),
                             "--resume", str(checkpoint), "--steps", "2"], capsys)
    assert status == EXIT_USER_ERROR and len(lines) == 1 and "num_layers" in lines[0]
    assert not (tmp_path / "b").exists()


def test_dataset_with_another_text_length_is_refused_at_load(tmp_path, capsys):
    import torch

    from cogvx_mega.data.latent_dataset import LatentDataset

    folder = tmp_path / "latents"  # tiny takes 16 text tokens of width 32; this cache has 8
    LatentDataset(torch.randn(2, 3, 4, 8, 8), torch.randn(2, 8, 32)).save(str(folder))
    status, lines = run_cli(["train", "--preset", "tiny", "--data", str(folder), "--run-dir", str(tmp_path / "run"),
                             "--steps", "1"], capsys)
    assert status == EXIT_USER_ERROR and len(lines) == 1
    assert "L=8" in lines[0] and "max_text_seq_length=16" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("verbose", [False, True])
def test_library_notices_stay_out_of_the_output_unless_verbose(tmp_path, verbose):
    """megatron warns at import and build time (no Apex, no Transformer Engine, deprecated scopes): `cogvx`
    keeps those notices out of its output; `-v` shows them."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    result = subprocess.run([sys.executable, "-m", "cogvx_mega.cli", "train", "--preset", "tiny", "--steps", "1",
                             "--run-dir", str(tmp_path / "r"), "data.num_synthetic_clips=2",
                             "training.micro_batch_size=2", *(["-v"] if verbose else [])],
                            capture_output=True, text=True, timeout=180, env={**env, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    noisy = [line for line in result.stderr.splitlines() if re.search(r"warn|Apex|deprecated", line, re.I)]
    assert bool(noisy) is verbose, noisy
