"""Every command that writes checks its outputs before any work (issue 26, items 4 and 5).

- Each output (export --out, convert DESTINATION, vae OUTPUT, data scan/encode --output, scaling's run_root and
  fit --out, launch's run dir, train --run-dir, sample --output) that lies under a file, that is of the wrong kind
  (a folder where a file goes, a file where a folder goes) or that lies on a filesystem this user cannot write is
  one line `cogvx: error: FLAG='PATH': ...`, exit 2, no traceback and nothing written. Every input given is
  missing or no model at all, so an output check that came after the inputs were read would report the input.
- Unwritable is real here: root ignores permission bits, so as root the output lies on a read-only tmpfs mounted
  in a private mount namespace (`unshare --mount`); as another user, in a folder of mode 0555.
- `cogvx convert` marks each output folder (cogvx_convert.json), and `--overwrite` replaces a previous
  conversion or an empty folder, never anything else.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from cogvx_mega.cli import EXIT_USER_ERROR, main


def scaling_spec(inputs: Path, run_root: Path) -> Path:
    """A valid one-run scaling spec whose runs go under `run_root`."""
    spec = inputs / f"spec-{zlib.crc32(str(run_root).encode()):08x}.yaml"
    spec.write_text(json.dumps({"preset": "tiny", "overrides": ["training.device=cpu"], "run_root": str(run_root),
                                "models": {"heads": [2]}, "tokens": [1.0e4], "global_batch": 1}))
    return spec


# name: (the command line writing `out`, with `inputs` a folder of inputs, the flag reported, the kind of `out`)
COMMANDS = {
    "export diffusers": (lambda i, out: ["export", "diffusers", "--ckpt", i / "no-checkpoint", "--vae", i / "no-vae",
                                         "--text-encoder", i / "no-t5", "--out", out, "--overwrite"], "--out", "folder"),
    "export lora": (lambda i, out: ["export", "lora", "--ckpt", i / "no-checkpoint", "--out", out, "--overwrite"],
                    "--out", "folder"),
    "convert transformer": (lambda i, out: ["convert", "project-to-diffusers", i / "not-a-checkpoint", out,
                                            "--overwrite"], "DESTINATION", "folder"),
    "convert vae": (lambda i, out: ["convert", "vae-sat-to-project", i / "not-a-checkpoint", out], "DESTINATION",
                    "folder"),
    "vae encode": (lambda i, out: ["vae", "encode", i / "no-video.mp4", out, "--vae", i / "no-vae", "--overwrite"],
                   "OUTPUT", "file"),
    "vae decode": (lambda i, out: ["vae", "decode", i / "no-latents.safetensors", out, "--vae", i / "no-vae",
                                   "--overwrite"], "OUTPUT", "file"),
    "data scan": (lambda i, out: ["data", "scan", i / "media", "--output", out, "--overwrite"], "--output", "file"),
    "data encode": (lambda i, out: ["data", "encode", "--manifest", i / "no-manifest.jsonl", "--vae", i / "no-vae",
                                    "--text-encoder", i / "no-t5", "--output", out, "--overwrite"], "--output",
                    "folder"),
    "scaling run": (lambda i, out: ["scaling", "run", scaling_spec(i, out)], "run_root", "folder"),
    "scaling fit": (lambda i, out: ["scaling", "fit", "--table", i / "table.csv", "--out", out], "--out", "folder"),
    # sbatch is never on PATH in these tests: a run-dir check after the sbatch lookup would report sbatch instead
    "launch slurm": (lambda i, out: ["launch", "slurm", "--nodes", "1", "--gpus-per-node", "1", "--", "--preset",
                                     "tiny", "--device", "cpu", "--run-dir", out], "--run-dir", "folder"),
    "train": (lambda i, out: ["train", "--preset", "tiny", "--device", "cpu", "--steps", "1", "--resume",
                              i / "no-checkpoint", "--run-dir", out], "--run-dir", "folder"),
    "demo": (lambda i, out: ["demo", "--run-dir", out, "--steps", "1"], "--run-dir", "folder"),
    "sample": (lambda i, out: ["sample", "--ckpt", i / "no-checkpoint", "--vae", i / "no-vae", "--prompt", "a cat",
                               "--output", out, "--overwrite"], "--output", "file"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Inputs that are cheap to refuse: an empty media folder, a folder that is no checkpoint, a valid fit table."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "media").mkdir()
    (folder / "not-a-checkpoint").mkdir()
    rows = [(n, d, 1.7 + 400 / n ** 0.34 + 410 / d ** 0.28) for n in (1e6, 1e7, 1e8) for d in (1e8, 1e9)]
    (folder / "table.csv").write_text("params,tokens,loss\n" + "".join(f"{n},{d},{loss}\n" for n, d, loss in rows))
    return folder


def command_line(name: str, inputs: Path, out: Path) -> tuple[list[str], str]:
    build, flag, _ = COMMANDS[name]
    return [str(part) for part in build(inputs, out)], flag


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def assert_one_line(status: int, err: str, flag: str, out: Path, needle: str) -> None:
    lines = err.strip().splitlines()
    assert status == EXIT_USER_ERROR, (status, lines)
    assert len(lines) == 1 and "Traceback" not in err, lines
    assert lines[0].startswith(f"cogvx: error: {flag}={str(out)!r}: ") and needle in lines[0], lines


@pytest.fixture
def no_sbatch(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))


@pytest.mark.parametrize("case", ["under a file", "of the wrong kind"])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_bad_output_is_one_line_before_any_work(name, case, inputs, tmp_path, capsys, no_sbatch):
    work = tmp_path / "work"
    work.mkdir()
    blocker = work / "a-file"
    blocker.write_bytes(b"keep")
    if case == "under a file":
        out, needle = blocker / "sub" / "out", f"lies under {blocker}, which is a file"
    elif COMMANDS[name][2] == "folder":
        out, needle = blocker, "is a file"
    else:
        out, needle = work / "a-folder", "is a folder"
        out.mkdir()
        (out / "inside.txt").write_text("keep")
    argv, flag = command_line(name, inputs, out)
    before, inputs_before = snapshot(work), snapshot(inputs)
    capsys.readouterr()
    status = main(argv)
    assert_one_line(status, capsys.readouterr().err, flag, out, needle)
    assert snapshot(work) == before
    assert {k: v for k, v in snapshot(inputs).items() if not k.startswith("spec-")} == \
        {k: v for k, v in inputs_before.items() if not k.startswith("spec-")}


def test_launch_checks_its_slurm_folder_and_script(inputs, tmp_path, capsys, no_sbatch):
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "cogvx-run.sbatch").mkdir()  # where the script goes
    argv, flag = command_line("launch slurm", inputs, run)
    assert main(argv) == EXIT_USER_ERROR
    assert_one_line(EXIT_USER_ERROR, capsys.readouterr().err, flag, run / "slurm" / "cogvx-run.sbatch", "is a folder")
    shutil.rmtree(run / "slurm")
    (run / "slurm").write_text("keep")  # where the script and the logs go
    assert main(argv) == EXIT_USER_ERROR
    assert_one_line(EXIT_USER_ERROR, capsys.readouterr().err, flag, run / "slurm", "is a file")
    assert sorted(p.name for p in run.iterdir()) == ["slurm"] and (run / "slurm").read_text() == "keep"


# --- a folder this user cannot write ---------------------------------------------------------------------------

RUNNER = """
import contextlib, io, json, os, sys
from cogvx_mega.cli import main
os.environ["PATH"] = ""  # no sbatch
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    results.append([status, err.getvalue()])
print(json.dumps(results))
"""


def read_only_wrapper(folder: Path) -> list[str]:
    """The command prefix under which `folder` cannot be written by this user; skips when there is none."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    mount = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'mount -t tmpfs -o ro tmpfs "{folder}" && exec "$@"', "sh"]
    if shutil.which("unshare") is None or subprocess.run([*mount, "true"], capture_output=True).returncode != 0:
        pytest.skip("as root only a read-only filesystem refuses a write, and a read-only tmpfs cannot be mounted "
                    "here (unshare --mount needs CAP_SYS_ADMIN)")
    return mount


def test_an_output_on_a_folder_that_refuses_writes_is_one_line_before_any_work(inputs, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    wrapper = read_only_wrapper(locked)
    try:
        cases = [(name, *command_line(name, inputs, locked / "sub" / "out")) for name in COMMANDS]
        result = subprocess.run([*wrapper, sys.executable, "-c", RUNNER, json.dumps([argv for _, argv, _ in cases])],
                                capture_output=True, text=True, timeout=240,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert result.returncode == 0, result.stderr[-3000:]
        for (name, _, flag), (status, err) in zip(cases, json.loads(result.stdout.strip().splitlines()[-1])):
            assert_one_line(status, err, flag, locked / "sub" / "out", f"cannot be written: creating a file in "
                                                                       f"{locked} fails")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# --- cogvx convert --overwrite ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKLCogVideoX

    folder = tmp_path_factory.mktemp("vae") / "diffusers"
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=4).save_pretrained(folder)
    return folder


def convert(*args) -> int:
    return main(["convert", *(str(a) for a in args)])


def test_every_conversion_is_marked_and_overwrite_replaces_only_a_previous_one(diffusers_vae, tmp_path, capsys):
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert convert("vae-diffusers-to-project", diffusers_vae, ours) == 0
    assert convert("vae-project-to-diffusers", ours, back) == 0
    marker = json.loads((ours / "cogvx_convert.json").read_text())
    assert marker["format"] == "cogvx-mega/convert-v1" and marker["kind"] == "vae-diffusers-to-project"
    assert (marker["part"], marker["from"], marker["to"]) == ("vae", "diffusers", "project")
    assert marker["source"] == str(diffusers_vae.resolve()) and marker["written"].endswith("Z")
    assert main(["checkpoint", "verify", str(ours)]) == 0  # the marker is no part of the checkpoint's files
    capsys.readouterr()

    assert convert("vae-diffusers-to-project", diffusers_vae, ours) == EXIT_USER_ERROR  # no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    (ours / "stale.txt").write_text("from the previous conversion")
    assert convert("vae-diffusers-to-project", diffusers_vae, ours, "--overwrite") == 0
    assert "stale.txt" not in {p.name for p in ours.iterdir()} and (ours / "cogvx_convert.json").is_file()
    assert convert("vae-diffusers-to-project", diffusers_vae, back, "--overwrite") == 0  # another direction's too
    assert json.loads((back / "cogvx_convert.json").read_text())["to"] == "project"
    (tmp_path / "empty").mkdir()
    assert convert("vae-diffusers-to-project", diffusers_vae, tmp_path / "empty", "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary leftovers


@pytest.mark.parametrize("what, needle", [("a folder of something else", "holds no cogvx_convert.json"),
                                          ("a folder with a foreign cogvx_convert.json", "not a previous conversion"),
                                          ("an export", "not a previous conversion"),
                                          ("a file", "is a file, not a previous conversion")])
def test_overwrite_refuses_what_is_not_a_previous_conversion(diffusers_vae, tmp_path, capsys, what, needle):
    target = tmp_path / "target"
    if what == "a file":
        target.write_text("precious")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("precious")
        if what == "a folder with a foreign cogvx_convert.json":
            (target / "cogvx_convert.json").write_text('{"tool": "someone else"}')
        elif what == "an export":
            (target / "cogvx_export.json").write_text('{"format": "cogvx-mega/export-v1", "kind": "lora"}')
    before, siblings = snapshot(tmp_path), sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    status = convert("vae-diffusers-to-project", diffusers_vae, target, "--overwrite")
    err = capsys.readouterr().err
    assert_one_line(status, err, "DESTINATION", target, needle)
    assert "--overwrite only" in err or "--overwrite replaces only" in err
    assert "nothing was deleted" in err
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == siblings


# --- a missing output folder -------------------------------------------------------------------------------------

def test_vae_encode_and_decode_create_a_missing_output_folder(diffusers_vae, tmp_path):
    pytest.importorskip("av")
    import torch

    from cogvx_mega.vae import io

    io.write_video(str(tmp_path / "clip.mp4"), torch.rand(1, 3, 5, 32, 32) - 0.5)
    latents, video = tmp_path / "new" / "latents" / "z.safetensors", tmp_path / "new" / "videos" / "clip.mp4"
    args = ["--vae", str(diffusers_vae), "--device", "cpu"]
    assert main(["vae", "encode", str(tmp_path / "clip.mp4"), str(latents), *args]) == 0 and latents.is_file()
    assert main(["vae", "decode", str(latents), str(video), *args]) == 0 and video.is_file()
