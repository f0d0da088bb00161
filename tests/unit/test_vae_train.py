"""`cogvx vae train` (issue 29) as a user runs it: the tiny preset learns (reconstruction loss down 2x in 200
steps, `cogvx vae eval` PSNR rising over its checkpoints), a run killed by SIGKILL resumes to the uninterrupted
run's numbers and weights, the trained VAE exports to diffusers and decodes there as here, the two-stage example
dry-runs, and bad input is one line, exit 2, nothing written. Layout parity: tests/distributed/test_vae_training.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogvx_mega.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "vae_train"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from vae_training import clip_manifest, lpips_files

    root = tmp_path_factory.mktemp("vae_train")
    vgg, lin = lpips_files(root / "lpips")
    return {"root": root, "manifest": clip_manifest(root / "clips", clips=4, frames=24, fps=16, short=1),
            "lpips": [f"vae_train.lpips_vgg={vgg}", f"vae_train.lpips_lin={lin}"]}


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_tiny_preset_learns_and_eval_shows_psnr_rising(media, tmp_path, capsys):
    run = tmp_path / "run"
    # LPIPS off: with random VGG weights (all a test has) it is no perceptual target
    assert main(["vae", "train", "--preset", "tiny", "--data", media["manifest"], "--run-dir", str(run),
                 "--steps", "200", "loss.perceptual_weight=0", "vae_train.keep_checkpoints=4"]) == 0
    history = rows(run)
    assert [r["step"] for r in history] == list(range(1, 201))
    for field in ("loss", "recon_loss", "kl_loss", "perceptual_loss", "gan_loss", "disc_loss", "adaptive_weight"):
        assert all(field in r for r in history), field
    assert history[0]["gan_on"] is False and history[-1]["gan_on"] is True  # the GAN switched on at step 100
    first = sum(r["recon_loss"] for r in history[:10]) / 10
    last = sum(r["recon_loss"] for r in history[-10:]) / 10
    assert first >= 2 * last, (first, last)
    capsys.readouterr()
    psnr = []
    for step in (50, 100, 150, 200):
        report = tmp_path / f"eval_{step}.json"
        assert main(["vae", "eval", "--vae", str(run / "checkpoints" / f"step_{step:08d}"), "--data",
                     media["manifest"], "--frames", "9", "--size", "32", "--output", str(report)]) == 0
        assert "psnr" in capsys.readouterr().out
        psnr.append(json.loads(report.read_text())["mean"]["psnr"])
    assert psnr == sorted(psnr) and psnr[-1] > psnr[0] + 1.0, psnr


def _cli(args: list[str], **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), **env}
    return subprocess.run([sys.executable, "-m", "cogvx_mega.cli", "vae", "train", *args], env=environment,
                          capture_output=True, text=True, timeout=600, start_new_session=True)


def test_resume_after_sigterm_sigkill_and_a_hang_equals_the_uninterrupted_run(media, tmp_path):
    from safetensors.torch import load_file

    common = ["--preset", "tiny", "--data", media["manifest"], *media["lpips"], "loss.gan_start_step=2", "loss.lpips_frames=2",
              "vae_train.save_interval=2", "vae_train.steps=6"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _cli([*common, "--run-dir", str(whole)]).returncode == 0
    # SIGTERM during step 3 (a scheduler's stop): step 3 finishes, is saved, exit 128 + 15
    stopped = _cli([*common, "--run-dir", str(cut)], COGVX_FAULT_INJECT="sigterm@3")
    assert stopped.returncode == 143, stopped.stderr
    assert "interrupted by SIGTERM at step 3" in stopped.stderr
    assert [p.name for p in sorted((cut / "checkpoints").iterdir())] == ["step_00000002", "step_00000003"]
    # then SIGKILL during step 5 of the resumed run: nothing saved after step 4
    killed = _cli([*common, "--run-dir", str(cut), "--resume", "auto"], COGVX_FAULT_INJECT="step@5")
    assert killed.returncode == -9, killed.stderr
    assert [p.name for p in sorted((cut / "checkpoints").iterdir())][-1] == "step_00000004"
    # then a hang inside step 6 of the next resumed run: its watchdog dumps the stacks and exits 75 after 2 s
    hung = _cli([*common, "--run-dir", str(cut), "--resume", "auto", "vae_train.hang_timeout_s=2"],
                COGVX_FAULT_INJECT="hang@6")
    assert hung.returncode == 75, hung.stderr
    header = next(line for line in hung.stderr.splitlines() if "no VAE training progress" in line)
    assert "after step 5 (vae_train.hang_timeout_s=2): stacks of every thread follow, then exit 75" in header
    assert "in hang_here" in hung.stderr and "in hang_here" in (cut / "hangs" / "step5-rank0.txt").read_text()
    assert [p.name for p in sorted((cut / "checkpoints").iterdir())][-1] == "step_00000004"
    resumed = _cli([*common, "--run-dir", str(cut), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step_00000004" in resumed.stderr
    assert rows(cut) == [{**r, "samples_per_s": rows(cut)[i]["samples_per_s"]} for i, r in enumerate(rows(whole))]
    for name in ("model.safetensors", "discriminator.safetensors"):
        expected, found = load_file(whole / "checkpoints" / "step_00000006" / name), \
            load_file(cut / "checkpoints" / "step_00000006" / name)
        assert expected.keys() == found.keys()
        for key in expected:
            assert torch.equal(expected[key], found[key]), f"{name} {key}"
    optimizer_whole = torch.load(whole / "checkpoints" / "step_00000006" / "optimizer.pt", weights_only=True)
    optimizer_cut = torch.load(cut / "checkpoints" / "step_00000006" / "optimizer.pt", weights_only=True)
    for part in ("vae", "discriminator"):
        for index, state in optimizer_whole[part]["state"].items():
            assert torch.equal(state["exp_avg_sq"], optimizer_cut[part]["state"][index]["exp_avg_sq"])
    assert main(["checkpoint", "verify", str(cut / "checkpoints" / "step_00000006")]) == 0


def test_the_trained_vae_exports_to_diffusers(media, tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    from cogvx_mega.tools.load import load_vae

    run = tmp_path / "run"
    assert main(["vae", "train", "--preset", "tiny", "--data", media["manifest"], "--run-dir", str(run), "--steps",
                 "2", "loss.perceptual_weight=0", "vae_train.lr=0.05"]) == 0
    step = run / "checkpoints" / "step_00000002"
    assert main(["convert", "vae-project-to-diffusers", str(step), str(tmp_path / "diffusers")]) == 0
    theirs = AutoencoderKLCogVideoX.from_pretrained(str(tmp_path / "diffusers")).eval()
    ours = load_vae(str(step))
    fresh = load_vae_fresh()
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.decode(latents)
        torch.testing.assert_close(theirs.decode(latents).sample, expected, atol=1e-5, rtol=1e-4)
        assert (fresh.decode(latents) - expected).abs().max() > 1e-3  # the training did change the weights


def load_vae_fresh():
    from cogvx_mega.vae.config import vae_preset
    from cogvx_mega.vae.model import CogVideoXVAE

    torch.manual_seed(42)  # the trainer's seed: its initial weights
    return CogVideoXVAE(vae_preset("tiny")).eval()


def test_the_two_stage_example_dry_runs(media, tmp_path, capsys, monkeypatch):
    from vae_training import clip_manifest

    long_clips = clip_manifest(tmp_path / "long", clips=1, frames=161, fps=16, height=32, width=32)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert main(["vae", "train", "--config", str(EXAMPLES / "stage1-256px-17f.yaml"), "--data", long_clips,
                 "--run-dir", str(tmp_path / "s1"), "--dry-run", *media["lpips"]]) == 0
    plan = capsys.readouterr().out
    assert "data parallel 8 x context parallel 1" in plan and "17 frames at 256x256" in plan
    assert main(["vae", "train", "--config", str(EXAMPLES / "stage2-256px-161f-cp.yaml"), "--data", long_clips,
                 "--run-dir", str(tmp_path / "s2"), "--cp", "4", "--dry-run", *media["lpips"]]) == 0
    plan = capsys.readouterr().out
    assert "data parallel 2 x context parallel 4" in plan and "161 frames at 256x256" in plan
    assert "rank 3: frames 121..160 (latent 31..40)" in plan
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


def _refused(args: list[str], capsys, world: int = 1) -> str:
    capsys.readouterr()
    os.environ["WORLD_SIZE"] = str(world)  # what torchrun would say (only read before any process group)
    try:
        status = main(["vae", "train", *args])
    finally:
        del os.environ["WORLD_SIZE"]
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_and_nothing_is_written(media, tmp_path, capsys):
    from vae_training import clip_manifest

    from cogvx_mega.checkpoint.vae import save_vae_checkpoint
    from cogvx_mega.vae.config import VAEConfig
    from cogvx_mega.vae.model import CogVideoXVAE

    run = tmp_path / "run"
    base = ["--preset", "tiny", "--run-dir", str(run), "loss.perceptual_weight=0"]
    short = clip_manifest(tmp_path / "short", clips=2, frames=6, fps=8)
    err = _refused([*base, "--data", short], capsys)
    assert "vae_train.frames=9" in err and "longest gives 5" in err
    other = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=8,
                      temporal_compression_ratio=2)
    save_vae_checkpoint(str(tmp_path / "other_vae"), CogVideoXVAE(other).state_dict(), other)
    err = _refused([*base, "--data", media["manifest"], "--init-from", str(tmp_path / "other_vae")], capsys)
    assert "latent_channels 8 (preset 16)" in err
    err = _refused([*base, "--data", media["manifest"], "--cp", "4"], capsys)
    assert "--cp=4" in err and "5 latent frames" in err and "--cp 2 or less" in err
    err = _refused([*base, "--data", media["manifest"], "--cp", "2"], capsys, world=2)  # 2 ranks' 4 frames each
    assert "windows of 8 frames" in err and "set vae_train.disc_frame_num=4" in err
    err = _refused(["--preset", "tiny", "--run-dir", str(run), "--data", media["manifest"],
                    "vae_train.lpips_vgg=/nowhere/vgg16.pth", "vae_train.lpips_lin=/nowhere/vgg.pth"], capsys)
    assert "vae_train.lpips_vgg='/nowhere/vgg16.pth'" in err
    err = _refused([*base, "--data", media["manifest"], "vae_train.hang_timeout_s=-1"], capsys)
    assert "vae_train.hang_timeout_s=-1" in err and "0 / null for no watchdog" in err
    assert not run.exists()


def test_keyed_clip_draws(media, tmp_path):
    """fps from the set per slot (both drawn), a clip's own lower rate kept, short clips left out and counted, a
    corrupt clip skipped, counted and replaced by a keyed draw, the same draws in any process."""
    from vae_training import clip_manifest

    from cogvx_mega.data.decode import DecodeSpec, decode_clip
    from cogvx_mega.data.vae_clips import VAETrainingClips

    clips = VAETrainingClips(media["manifest"], 9, 32, [8, 16], 2, seed=3)
    assert len(clips) == 4 and clips.left_out == 1  # the 3-frame clip
    draws = [clips.draw(slot) for slot in range(64)]
    assert {d.fps for d in draws} == {8.0, 16.0}
    assert [d.record["path"] for d in draws[:4]] != [d.record["path"] for d in draws[4:8]]  # epochs reshuffle
    assert sorted(d.record["path"] for d in draws[:4]) == sorted(r["path"] for r, _ in clips.clips)  # each once
    assert draws == [VAETrainingClips(media["manifest"], 9, 32, [8, 16], 2, seed=3).draw(s) for s in range(64)]
    # 12 fps clips of 10 frames: at 8 fps they give 7 frames (too few); 16 fps is above their rate, so they are
    # read at their own 12 fps, which gives 9 of their 10 frames: 16 is the only fps they are drawn at
    slow = clip_manifest(tmp_path / "slow", clips=2, frames=10, fps=12)
    slow_clips = VAETrainingClips(slow, 9, 32, [8, 16], 2, seed=0, random_start=False)
    assert all(slow_clips.draw(s).fps == 16.0 for s in range(16))
    video, draw = slow_clips.read(0)
    torch.testing.assert_close(video, decode_clip(draw.record, DecodeSpec(9, 32, 32, 12.0, 2)))
    # a corrupt file listed in the manifest: skipped, counted, replaced
    lines = Path(media["manifest"]).read_text().splitlines()
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\0" * 2048)
    record = dict(json.loads(lines[0]), path=str(broken))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    mixed_clips = VAETrainingClips(str(mixed), 9, 32, [8, 16], 2, seed=0)
    for slot in range(8):
        video, draw = mixed_clips.read(slot)
        assert video.shape == (3, 9, 32, 32) and draw.record["path"] != str(broken)
    assert mixed_clips.skipped >= 1
