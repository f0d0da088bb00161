"""Release friction (issue 26, item 5): what a release's users and its team meet.

- Permissions: every folder the project writes atomically (a diffusers export, a LoRA export, a converted
  checkpoint) has files 0666 and folders 0777 less the process umask, although safetensors writes its files 0600
  and the T5 folder copied in holds such files.
- The export marker (cogvx_export.json) is in every export, diffusers loads the folders with it present, and
  `--overwrite` replaces only a previous export of the same kind (or an empty folder): anything else is refused
  with one line, exit 2, and nothing is deleted or written.
- The model card tells how to load the release in diffusers with `max_sequence_length` equal to the model's
  text length (the image argument for image-to-video models), the step, and the recorded training setup; its
  snippet compiles, calls the pipeline with arguments it takes, and runs.
"""
from __future__ import annotations

import ast
import json
import os
import re
import stat
from pathlib import Path

import pytest

from cogvx_mega.cli import EXIT_USER_ERROR, main

TRAIN = ["--preset", "tiny", "--device", "cpu", "data.num_synthetic_clips=4", "training.micro_batch_size=2",
         "--steps", "1"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 1-step tiny training checkpoint, a 1-step LoRA run on it, a VAE and a T5 folder."""
    from diffusers import AutoencoderKLCogVideoX
    from text_encoder import make_tiny_t5

    root = tmp_path_factory.mktemp("release-files")
    assert main(["train", *TRAIN, "--run-dir", str(root / "run")]) == 0
    ckpt = root / "run" / "checkpoints" / "step_00000001"
    assert main(["train", *TRAIN, "finetune.lora_rank=2", "--init-from", str(ckpt), "--run-dir",
                 str(root / "lora-run")]) == 0
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=4).save_pretrained(root / "vae")
    make_tiny_t5(root / "t5", d_model=32)  # the tiny preset's text width; its weights are written 0600
    return {"root": root, "ckpt": ckpt, "lora": root / "lora-run" / "checkpoints" / "step_00000001",
            "vae": root / "vae", "t5": root / "t5"}


def export_diffusers(assets, out, *extra) -> int:
    return main(["export", "diffusers", "--ckpt", str(assets["ckpt"]), "--vae", str(assets["vae"]),
                 "--text-encoder", str(assets["t5"]), "--out", str(out), *extra])


def export_lora(assets, out, *extra) -> int:
    return main(["export", "lora", "--ckpt", str(assets["lora"]), "--out", str(out), *extra])


def modes(folder: Path) -> dict[str, int]:
    """{path relative to folder ('.' for itself): permission bits} of everything in it."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def hidden_siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


# --- permissions ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)],
                         ids=["umask-022", "umask-002"])
def test_release_files_follow_the_umask(assets, tmp_path, umask, file_mode, folder_mode):
    previous = os.umask(umask)
    try:
        assert export_diffusers(assets, tmp_path / "release") == 0
        assert export_lora(assets, tmp_path / "lora") == 0
        assert main(["convert", "project-to-diffusers", str(assets["ckpt"]), str(tmp_path / "converted")]) == 0
    finally:
        os.umask(previous)
    for name in ("release", "lora", "converted"):
        found = modes(tmp_path / name)
        assert len(found) > 1, name
        for path, mode in found.items():
            expected = folder_mode if (tmp_path / name / path).is_dir() else file_mode
            assert mode == expected, f"{name}/{path}: {oct(mode)}, expected {oct(expected)}"
    assert "transformer/diffusion_pytorch_model.safetensors" in modes(tmp_path / "release")
    assert "text_encoder/model.safetensors" in modes(tmp_path / "release")  # copied from a 0600 source


def test_atomic_folders_keep_setgid_and_leave_links_alone(tmp_path):
    import torch
    from safetensors.torch import save_file

    from cogvx_mega.checkpoint.atomic import atomic_directory

    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    outside.chmod(0o600)
    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp / "weights.safetensors"))
            (tmp / "shared").mkdir()
            (tmp / "shared").chmod(0o2700)  # a setgid folder, as a team's shared tree has
            (tmp / "shared" / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "shared" / "run.sh").chmod(0o700)
            (tmp / "link").symlink_to(outside)
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert stat.S_IMODE((out / "weights.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "shared").stat().st_mode) == 0o2755
    assert stat.S_IMODE((out / "shared" / "run.sh").stat().st_mode) == 0o755
    assert (out / "link").is_symlink() and stat.S_IMODE(outside.stat().st_mode) == 0o600


# --- the marker and --overwrite -------------------------------------------------------------------------------

def test_every_export_holds_the_marker_and_diffusers_loads_it(assets, tmp_path):
    from diffusers import CogVideoXPipeline

    assert export_diffusers(assets, tmp_path / "release") == 0
    assert export_lora(assets, tmp_path / "lora") == 0
    for name, kind, source in (("release", "diffusers", assets["ckpt"]), ("lora", "lora", assets["lora"])):
        marker = json.loads((tmp_path / name / "cogvx_export.json").read_text())
        assert marker["format"] == "cogvx-mega/export-v1" and marker["kind"] == kind, marker
        assert marker["tool"] == "cogvx-mega" and marker["version"] and marker["step"] == 1
        assert marker["source"] == str(Path(source).resolve()) and marker["written"].endswith("Z")
    pipeline = CogVideoXPipeline.from_pretrained(str(tmp_path / "release"))
    pipeline.load_lora_weights(str(tmp_path / "lora"))
    assert any("lora" in name for name, _ in pipeline.transformer.named_parameters())


def test_overwrite_replaces_a_previous_export_or_an_empty_folder(assets, tmp_path):
    assert export_lora(assets, tmp_path / "lora") == 0
    (tmp_path / "lora" / "stale.txt").write_text("from the previous export")
    assert export_lora(assets, tmp_path / "lora", "--overwrite") == 0
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["cogvx_export.json",
                                                                     "pytorch_lora_weights.safetensors"]
    (tmp_path / "empty").mkdir()
    assert export_lora(assets, tmp_path / "empty", "--overwrite") == 0
    assert (tmp_path / "empty" / "cogvx_export.json").is_file()
    assert hidden_siblings(tmp_path / "lora") == [] and hidden_siblings(tmp_path / "empty") == []


def make_target(tmp_path: Path, assets, what: str) -> Path:
    if what == "a folder that is not an export":
        target = tmp_path / "data"
        (target / "clips").mkdir(parents=True)
        (target / "clips" / "a.mp4").write_bytes(b"precious")
        (target / "notes.txt").write_text("precious")
    elif what == "a file":
        target = tmp_path / "notes.txt"
        target.write_text("precious")
    elif what == "an export of the other kind":
        target = tmp_path / "release"
        assert export_diffusers(assets, target) == 0
    elif what == "a folder with a foreign cogvx_export.json":
        target = tmp_path / "other"
        target.mkdir()
        (target / "cogvx_export.json").write_text('{"tool": "someone else"}')
    return target


@pytest.mark.parametrize("what, needle", [("a folder that is not an export", "not a previous export"),
                                          ("a file", "not a previous export"),
                                          ("an export of the other kind", "not a lora one"),
                                          ("a folder with a foreign cogvx_export.json", "not a previous export")])
def test_overwrite_refuses_what_is_not_a_previous_export(assets, tmp_path, capsys, what, needle):
    target = make_target(tmp_path, assets, what)
    before = {p: (p.read_bytes() if p.is_file() else None) for p in [target, *target.rglob("*")]}
    siblings = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert export_lora(assets, target, "--overwrite") == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(target) in err[0] and needle in err[0] and "nothing was deleted" in err[0], err
    assert {p: (p.read_bytes() if p.is_file() else None) for p in [target, *target.rglob("*")]} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings  # no temporary folder left either


def test_without_overwrite_an_export_is_still_refused(assets, tmp_path, capsys):
    assert export_lora(assets, tmp_path / "lora") == 0
    capsys.readouterr()
    assert export_lora(assets, tmp_path / "lora") == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0], err


# --- the model card -------------------------------------------------------------------------------------------

def snippet_of(card: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 1, card
    return blocks[0]


def pipeline_call(code: str) -> tuple[str, dict]:
    """(pipeline class, {keyword: source text}) of the snippet's `pipe(...)` call; the code must compile."""
    tree = ast.parse(compile(code, "snippet", "exec", ast.PyCF_ONLY_AST))
    pipeline = next(node.value.func.value.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
                    and node.value.func.attr == "from_pretrained")
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "pipe")
    return pipeline, {kw.arg: ast.unparse(kw.value) for kw in call.keywords}


def check_against_diffusers(pipeline: str, keywords: dict) -> None:
    import inspect

    import diffusers

    parameters = inspect.signature(getattr(diffusers, pipeline).__call__).parameters
    assert set(keywords) <= set(parameters), set(keywords) - set(parameters)


def test_the_model_card_has_a_usage_snippet_that_runs_and_the_training_setup(assets, tmp_path, monkeypatch):
    import diffusers.utils

    assert export_diffusers(assets, tmp_path / "release") == 0
    card = (tmp_path / "release" / "README.md").read_text()
    assert "max_sequence_length=16" in card and "at training step 1." in card  # the tiny preset's text length
    for line in ("- Training step: 1 of 1 planned (2 samples seen)", "- Preset: `tiny`", "9x64x64",
                 "- Global batch: 2 samples a step (micro batch 2)", "- Learning rate: 0.002 peak",
                 "- Precision: fp32"):
        assert line in card, line
    code = snippet_of(card)
    pipeline, keywords = pipeline_call(code)
    assert pipeline == "CogVideoXPipeline" and keywords["max_sequence_length"] == "16"
    assert (keywords["num_frames"], keywords["height"], keywords["width"]) == ("9", "64", "64")
    check_against_diffusers(pipeline, keywords)
    # run it on the CPU, two steps, the video kept in memory (writing one needs opencv or imageio)
    written = {}
    monkeypatch.setattr(diffusers.utils, "export_to_video",
                        lambda frames, path, fps: written.update(frames=len(frames), size=frames[0].size, fps=fps))
    code = code.replace('pipe.to("cuda")', 'pipe.to("cpu")').replace("num_inference_steps=50", "num_inference_steps=2")
    exec(compile(code, "snippet", "exec"), {})
    assert written == {"frames": 9, "size": (64, 64), "fps": 8}


@pytest.mark.parametrize("preset", ["tiny-i2v", "cogvideox-5b-i2v", "cogvideox1.5-5b"])
def test_the_card_of_other_families_calls_their_pipeline(preset):
    from cogvx_mega.config.presets import get_preset
    from cogvx_mega.tools.export import model_card

    config = get_preset(preset)
    meta = {"format": "cogvx-mega/torch-dist-v1", "step": 500, "preset": preset, "global_batch": 8,
            "consumed_samples": 4000, "training": {"steps": 1000, "lr": 1e-4, "bf16": True, "device": "cuda",
                                                   "mixed_precision": "auto", "micro_batch_size": 1},
            "data": {"buckets": ["1x480x720", "49x480x720", "49x720x480"], "fps": 8.0}}
    card = model_card(config.model, meta, "runs/x/checkpoints/step_00000500", "release", "bf16")
    pipeline, keywords = pipeline_call(snippet_of(card))
    check_against_diffusers(pipeline, keywords)
    assert keywords["max_sequence_length"] == str(config.model.max_text_seq_length)
    assert (keywords["num_frames"], keywords["height"], keywords["width"]) == ("49", "480", "720")
    assert "- Training step: 500 of 1,000 planned (4,000 samples seen)" in card
    assert "bf16 weights and compute" in card and "torch_dtype=torch.bfloat16" in card
    if config.model.is_image_to_video:
        assert pipeline == "CogVideoXImageToVideoPipeline" and keywords["image"] == "image"
        assert "pipeline_tag: image-to-video" in card
    else:
        assert pipeline == "CogVideoXPipeline" and "image" not in keywords
