"""`cogvx vae eval` (`tools/vae_eval.py`): the report's scores are those of the VAE's posterior-mean reconstruction of
each decoded clip, short and unreadable clips are skipped with their reasons, and bad inputs are refused before
anything is written."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.tools.vae_eval import evaluate_vae, format_table

FRAMES, SIZE, FPS = 9, 32, 8.0  # the tiny VAE compresses time and space by 2: 1 + 2k frames, even sizes


def write_manifest(path, media_paths, corrupt=()):
    """A manifest of the probed `media_paths`, plus a line for each of `corrupt` that claims a readable 12-frame
    clip (a scan would drop such a file; a manifest edited or made elsewhere can still list it)."""
    from cogvx_mega.data.manifest import ClipRecord, probe_media
    from cogvx_mega.data.manifest import write_manifest as write_records

    records = [ClipRecord(path=str(p), caption="a moving square", **probe_media(p)) for p in media_paths]
    records += [ClipRecord(path=str(p), caption="a broken file", kind="video", container="mov", codec="h264",
                           fps=FPS, frames=12, width=48, height=40) for p in corrupt]
    write_records(records, path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A seeded tiny VAE checkpoint; three good 12-frame clips, a 3-frame clip and random bytes named .mp4."""
    from media import moving_square, write_video

    from cogvx_mega.checkpoint.vae import save_vae_checkpoint
    from cogvx_mega.vae.config import vae_preset
    from cogvx_mega.vae.model import CogVideoXVAE

    root = tmp_path_factory.mktemp("vae_eval")
    config = vae_preset("tiny")
    torch.manual_seed(0)
    save_vae_checkpoint(str(root / "vae"), CogVideoXVAE(config).state_dict(), config)
    good = [write_video(root / f"good_{i}.mp4", moving_square(12, 40, 48, seed=i), 8, "libx264", "yuv420p")
            for i in range(3)]
    short = write_video(root / "short.mp4", moving_square(3, 40, 48, seed=9), 8, "libx264", "yuv420p")
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    manifest = write_manifest(root / "m.jsonl", [good[0], short, good[1], good[2]], corrupt=[corrupt])
    return {"root": root, "vae": str(root / "vae"), "manifest": manifest, "good": [str(p) for p in good],
            "short": str(short), "corrupt": str(corrupt)}


@pytest.fixture(scope="module")
def evaluated(setup):
    output = setup["root"] / "report.json"
    report = evaluate_vae(setup["vae"], setup["manifest"], FRAMES, SIZE, FPS, device="cpu", output=str(output))
    return report, output


def test_scores_are_those_of_the_posterior_mean_reconstruction(setup, evaluated):
    from cogvx_mega.data.decode import DecodeSpec, decode_clip
    from cogvx_mega.data.manifest import read_manifest
    from cogvx_mega.tools.load import load_vae
    from cogvx_mega.vae.metrics import ReconstructionScores

    report, _ = evaluated
    assert [row["path"] for row in report["clips"]] == setup["good"]  # manifest order, the bad ones left out
    vae = load_vae(setup["vae"])
    records = {record["path"]: record for record in read_manifest(setup["manifest"])}
    spec = DecodeSpec(frames=FRAMES, height=SIZE, width=SIZE, fps=FPS, temporal_compression_ratio=2)
    for row in report["clips"]:
        video = decode_clip(records[row["path"]], spec)[None]
        assert video.shape == (1, 3, FRAMES, SIZE, SIZE)
        with torch.no_grad():
            reconstruction = vae.decode(vae.encode(video)).clamp(-1, 1)
        expected = ReconstructionScores.of(video, reconstruction)
        assert row["psnr"] == pytest.approx(expected.psnr, abs=1e-6)
        assert row["ssim"] == pytest.approx(expected.ssim, abs=1e-6)
        assert row["flicker"] == pytest.approx(expected.flicker, abs=1e-6)
        identity = ReconstructionScores.of(video, video)  # what scoring the input against itself would give
        assert row["psnr"] < identity.psnr - 1 and row["ssim"] < identity.ssim


def test_mean_row_and_report_fields(setup, evaluated):
    report, _ = evaluated
    for name in ("psnr", "ssim", "flicker"):
        assert report["mean"][name] == pytest.approx(statistics.fmean(row[name] for row in report["clips"]), abs=1e-12)
    assert (report["vae"], report["data"], report["frames"], report["size"], report["fps"]) == (
        setup["vae"], setup["manifest"], FRAMES, SIZE, FPS)


def test_short_and_corrupt_clips_are_skipped_with_their_reasons(setup, evaluated):
    report, _ = evaluated
    reasons = {item["path"]: item["reason"] for item in report["skipped"]}
    assert set(reasons) == {setup["short"], setup["corrupt"]}
    assert "too short" in reasons[setup["short"]] and "3 frames" in reasons[setup["short"]]
    assert "unreadable" in reasons[setup["corrupt"]]
    assert not {setup["short"], setup["corrupt"]} & {row["path"] for row in report["clips"]}


def test_json_file_holds_the_report_and_the_table_its_numbers(evaluated):
    report, output = evaluated
    assert json.loads(output.read_text()) == report
    table = format_table(report)
    lines = table.splitlines()
    assert len(lines) == 1 + len(report["clips"]) + 1 + 1  # header, clips, mean, skipped count
    for line, row in zip(lines[1:], report["clips"]):
        assert line.startswith(row["path"])
        assert line.split()[1:] == [f"{row['psnr']:.2f}", f"{row['ssim']:.4f}", f"{row['flicker']:.5f}"]
    assert lines[-2].split()[1] == f"{report['mean']['psnr']:.2f}"
    assert "skipped 2" in lines[-1]


def test_clips_takes_the_first_records(setup):
    report = evaluate_vae(setup["vae"], setup["manifest"], FRAMES, SIZE, FPS, clips=2, device="cpu")
    assert [row["path"] for row in report["clips"]] == setup["good"][:1]
    assert [item["path"] for item in report["skipped"]] == [setup["short"]]


@pytest.mark.parametrize("frames, size, flag, named", [(10, SIZE, "--frames", "10"), (0, SIZE, "--frames", "0"),
                                                       (FRAMES, 33, "--size", "33")])
def test_bad_shapes_are_refused_before_anything_is_written(setup, tmp_path, frames, size, flag, named):
    output = tmp_path / "report.json"
    with pytest.raises(ConfigError, match=named) as caught:
        evaluate_vae(setup["vae"], setup["manifest"], frames, size, FPS, device="cpu", output=str(output))
    assert caught.value.field_name == flag and caught.value.value == int(named)
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_an_existing_output_is_kept_without_overwrite(setup, tmp_path):
    output = tmp_path / "report.json"
    output.write_text("earlier\n")
    with pytest.raises(ConfigError, match="already exists") as caught:
        evaluate_vae(setup["vae"], setup["manifest"], FRAMES, SIZE, FPS, device="cpu", output=str(output))
    assert caught.value.field_name == "--output" and output.read_text() == "earlier\n"
    report = evaluate_vae(setup["vae"], setup["manifest"], FRAMES, SIZE, FPS, clips=1, device="cpu",
                          output=str(output), overwrite=True)
    assert json.loads(output.read_text()) == report


def test_a_manifest_of_only_short_clips_is_refused(setup, tmp_path):
    manifest = write_manifest(tmp_path / "short.jsonl", [setup["short"], setup["short"]])
    output = tmp_path / "report.json"
    with pytest.raises(ConfigError, match=f"every clip is shorter than {FRAMES} frames at 8 fps") as caught:
        evaluate_vae(setup["vae"], manifest, FRAMES, SIZE, FPS, device="cpu", output=str(output))
    assert caught.value.field_name == "--data" and caught.value.value == manifest and not output.exists()
