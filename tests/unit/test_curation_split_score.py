"""`cogvx data split` and `cogvx data score` on real media made here: shots at a hard cut, motion of a static and a
moving clip, bad clips reported and kept, resume after a kill, parts, the aesthetic predictor on a tiny CLIP."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from media import moving_square, write_video

from cogvx_mega.cli import main
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.shots import ShotOptions
from cogvx_mega.tools import data_curate
from cogvx_mega.tools.data_curate import MotionOptions, ScoreOptions, SplitOptions, score_manifest, split_manifest

FPS = 24
HEIGHT, WIDTH = 64, 96


def still(frames: int, seed: int) -> np.ndarray:
    """A textured picture that does not move (smooth blobs, so that the codec keeps it steady)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
    picture = np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))
    return np.repeat(picture[None], frames, axis=0)


def line(path, frames: int, **extra) -> dict:
    return {"path": str(path), "caption": f"a clip {path.name}", "kind": "video", "container": "mp4",
            "codec": "h264", "fps": float(FPS), "frames": frames, "width": WIDTH, "height": HEIGHT, **extra}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """cut.mp4: 1.5 s of a moving square, a hard cut, 1.5 s of another scene (frame 36 is the cut);
    three.mp4: 1.5 s, 0.75 s, 1.5 s scenes; static.mp4 and moving.mp4: 2 s each; broken files."""
    root = tmp_path_factory.mktemp("curation")
    write_video(root / "cut.mp4", np.concatenate([moving_square(36, HEIGHT, WIDTH, seed=1), still(36, seed=2)]),
                FPS, "libx264", "yuv420p")
    write_video(root / "three.mp4", np.concatenate([still(36, seed=3), moving_square(18, HEIGHT, WIDTH, seed=4),
                                                    still(36, seed=5)]), FPS, "libx264", "yuv420p")
    write_video(root / "static.mp4", still(48, seed=6), FPS, "libx264", "yuv420p")
    write_video(root / "moving.mp4", moving_square(48, HEIGHT, WIDTH, seed=7), FPS, "libx264", "yuv420p")
    write_video(root / "moving.webm", moving_square(48, HEIGHT, WIDTH, seed=8), FPS, "libvpx-vp9", "yuv420p")
    whole = (root / "moving.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (root / "notes.mp4").write_text("this is a text file, not a video\n")
    from PIL import Image

    Image.fromarray(still(1, seed=9)[0]).save(root / "picture.png")
    return root


def write_manifest(path, lines) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in lines))
    return str(path)


def read(path) -> list[dict]:
    return [json.loads(text) for text in open(path).read().splitlines()]


@pytest.mark.parametrize("detector, every_frame", [("content", False), ("adaptive", False), ("content", True)])
def test_a_hard_cut_splits_into_two_shots_at_the_cut(media, tmp_path, detector, every_frame):
    from cogvx_mega.data.decode import DecodeSpec, decode_clip

    manifest = write_manifest(tmp_path / "m.jsonl", [line(media / "cut.mp4", 72, extra_column="kept")])
    summary = split_manifest(manifest, str(tmp_path / "shots.jsonl"),
                             SplitOptions(ShotOptions(detector), min_shot_seconds=1.0, every_frame=every_frame),
                             progress=False)
    shots = read(tmp_path / "shots.jsonl")
    assert len(shots) == 2 and summary.shots == 2 and summary.dropped == 0 and summary.failed == 0
    assert shots[0]["start"] == 0.0 and shots[1]["end"] == 3.0
    assert abs(shots[1]["start"] * FPS - 36) <= 1 and shots[0]["end"] == shots[1]["start"]
    assert [s["shot_frames"] for s in shots] == [round(shots[0]["end"] * FPS), 72 - round(shots[0]["end"] * FPS)]
    for shot in shots:  # every other column kept; frames stays the file's, which the data path reads start/end in
        assert shot["caption"] == "a clip cut.mp4" and shot["extra_column"] == "kept" and shot["frames"] == 72
    # the data path decodes each shot from its own scene: the second is the still picture
    second = decode_clip(shots[1], DecodeSpec(frames=9, height=HEIGHT, width=WIDTH, fps=8))
    assert second.shape == (3, 9, HEIGHT, WIDTH)
    assert float((second[:, 1:] - second[:, :-1]).abs().mean()) < 0.02


def test_a_static_clip_scores_lower_motion_than_a_moving_one(media, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [line(media / "static.mp4", 48), line(media / "moving.mp4", 48),
                                                     line(media / "moving.webm", 48)])
    summary = score_manifest(manifest, str(tmp_path / "scored.jsonl"), ScoreOptions(motion=MotionOptions()),
                             workers=2, progress=False)
    static, moving, vp9 = (record["motion_score"] for record in read(tmp_path / "scored.jsonl"))
    assert summary.motion == 3 and summary.failed == 0
    assert moving > 0.5 and vp9 > 0.5 and static < moving / 5 and static < vp9 / 5, (static, moving, vp9)


def test_split_within_a_range_and_shots_shorter_than_the_shortest_bucket_dropped(media, tmp_path, capsys):
    """--preset tiny: a shot must fill a 9-frame bucket at 8 fps; the 0.75 s middle scene cannot (6 frames)."""
    manifest = write_manifest(tmp_path / "m.jsonl", [line(media / "three.mp4", 90),
                                                     line(media / "cut.mp4", 72, start=0.5, end=3.0),
                                                     {"path": str(media / "picture.png"), "caption": "a picture",
                                                      "kind": "image", "frames": 1, "width": WIDTH,
                                                      "height": HEIGHT}])
    output = tmp_path / "shots.jsonl"
    assert main(["data", "split", manifest, "--output", str(output), "--preset", "tiny", "--motion",
                 "--workers", "2"]) == 0
    shots = read(output)
    three = [s for s in shots if s["path"].endswith("three.mp4")]
    assert [(round(s["start"] * FPS), round(s["end"] * FPS)) for s in three] == [(0, 36), (54, 90)]
    cut = [s for s in shots if s["path"].endswith("cut.mp4")]
    assert cut[0]["start"] == 0.5 and abs(cut[0]["end"] * FPS - 36) <= 1 and cut[1]["end"] == 3.0
    assert all(math.isfinite(s["motion_score"]) for s in three + cut)
    assert shots[-1] == json.loads(open(manifest).read().splitlines()[2])  # the image passes through
    table = {row.rsplit(None, 1)[0].strip(): row.split()[-1] for row in capsys.readouterr().out.splitlines()[1:]}
    assert table["short shots dropped"] == "1" and table["shots found"] == "5" and table["lines written"] == "5"


def test_a_bad_clip_is_one_line_counted_and_kept_the_rest_processed(media, tmp_path, capsys):
    lines = [line(media / "static.mp4", 48), line(media / "notes.mp4", 48), line(media / "truncated.mp4", 48),
             line(media / "missing.mp4", 48), line(media / "moving.mp4", 48)]
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    for command in (["split", "--output", str(tmp_path / "shots.jsonl"), "--min-shot-seconds", "1"],
                    ["score", "--motion", "--output", str(tmp_path / "scored.jsonl")]):
        assert main(["data", command[0], manifest, *command[1:]]) == 0
        captured = capsys.readouterr()
        skipped = [text for text in captured.err.splitlines() if text.startswith("skipped ")]
        assert sorted(text.split(":")[0] for text in skipped) == sorted(
            f"skipped {media / name}" for name in ("notes.mp4", "truncated.mp4", "missing.mp4"))
        assert "3 failed" in captured.out
    scored = read(tmp_path / "scored.jsonl")
    assert [("motion_score" in record) for record in scored] == [True, False, False, False, True]
    assert scored[1:4] == lines[1:4]  # written unchanged: nothing lost
    assert read(tmp_path / "shots.jsonl")[1:4] == lines[1:4]


def test_a_killed_run_resumes_with_the_files_not_done(media, tmp_path, monkeypatch):
    lines = [line(media / name, frames) for name, frames in
             (("cut.mp4", 72), ("static.mp4", 48), ("moving.mp4", 48), ("three.mp4", 90))]
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    options = SplitOptions(min_shot_seconds=1.0, motion=MotionOptions())
    split_manifest(manifest, str(tmp_path / "whole.jsonl"), options, progress=False)
    real, calls = data_curate.split_group, []

    def killed_at_the_third(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill: nothing after this file is written
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data_curate, "split_group", killed_at_the_third)
    output = tmp_path / "shots.jsonl"
    with pytest.raises(KeyboardInterrupt):
        split_manifest(manifest, str(output), options, workers=1, progress=False)
    partial = tmp_path / "shots.jsonl.split-parts" / "part-00000-of-00001.partial.jsonl"
    assert not output.exists() and len(partial.read_text().splitlines()) == 2
    with open(partial, "a") as file:
        file.write('{"path": "cut by the kill')  # a line the kill cut short
    calls.clear()
    monkeypatch.setattr(data_curate, "split_group", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    with pytest.raises(ConfigError, match="other options"):
        split_manifest(manifest, str(output), SplitOptions(min_shot_seconds=2.0, motion=MotionOptions()),
                       progress=False)
    summary = split_manifest(manifest, str(output), options, progress=False)
    assert len(calls) == 2 and summary.resumed == 2 and summary.clips == 4
    assert read(output) == read(tmp_path / "whole.jsonl")
    assert not (tmp_path / "shots.jsonl.split-parts").exists()


def test_parts_merge_into_the_manifest_one_run_writes(media, tmp_path):
    lines = [line(media / name, frames) for name, frames in
             (("cut.mp4", 72), ("static.mp4", 48), ("moving.mp4", 48), ("three.mp4", 90), ("notes.mp4", 48))]
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    options = ScoreOptions(motion=MotionOptions())
    score_manifest(manifest, str(tmp_path / "whole.jsonl"), options, progress=False)
    output = str(tmp_path / "parts.jsonl")
    first = score_manifest(manifest, output, options, part=(1, 3), progress=False)
    second = score_manifest(manifest, output, options, part=(0, 3), progress=False)
    assert not first.merged and not second.merged and not (tmp_path / "parts.jsonl").exists()
    last = score_manifest(manifest, output, options, part=(2, 3), progress=False)
    assert last.merged and last.clips == 5 and last.failed == 1
    assert read(output) == read(tmp_path / "whole.jsonl")
    assert main(["data", "score", manifest, "--motion"]) == 0  # without --output: in place
    assert read(manifest) == read(tmp_path / "whole.jsonl")


def laion_state(width: int, relu: bool = False) -> dict:
    import torch.nn as nn

    layers = ([nn.Linear(width, 1024), nn.ReLU(), nn.Dropout(0.2), nn.Linear(1024, 128), nn.ReLU(), nn.Dropout(0.2),
               nn.Linear(128, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 1)] if relu
              else [nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
                    nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)])
    return {f"layers.{k}": v for k, v in nn.Sequential(*layers).state_dict().items()}


def test_aesthetic_score_from_a_tiny_clip_and_a_laion_head(media, tmp_path, capsys):
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from cogvx_mega.data.scores import laion_head

    torch.manual_seed(0)
    clip = tmp_path / "clip"
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    torch.save(laion_state(16), tmp_path / "head.pth")
    torch.save(laion_state(8), tmp_path / "narrow.pth")
    relu = laion_state(16, relu=True)
    assert isinstance(laion_head(relu)[1], torch.nn.ReLU)  # the ReLU variant's layout loads too
    manifest = write_manifest(tmp_path / "m.jsonl", [
        line(media / "moving.mp4", 48), line(media / "notes.mp4", 48),
        {"path": str(media / "picture.png"), "caption": "a picture", "kind": "image", "frames": 1}])
    output = tmp_path / "scored.jsonl"
    assert main(["data", "score", manifest, "--output", str(output), "--motion", "--aesthetic",
                 str(tmp_path / "head.pth"), "--aesthetic-clip", str(clip)]) == 0
    video, broken, image = read(output)
    assert math.isfinite(video["aesthetic_score"]) and math.isfinite(video["motion_score"])
    assert math.isfinite(image["aesthetic_score"]) and "motion_score" not in image
    assert "aesthetic_score" not in broken
    capsys.readouterr()
    assert main(["data", "score", manifest, "--output", str(tmp_path / "x.jsonl"), "--aesthetic",
                 str(tmp_path / "narrow.pth"), "--aesthetic-clip", str(clip)]) == 2
    assert "takes 8 features" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()


def test_raft_motion_with_random_weights_gives_a_finite_score(media, tmp_path):
    try:
        from torchvision.models.optical_flow import raft_small
    except Exception:  # not installed, or built for another torch (PyPI's wheels want CUDA torch)
        pytest.skip("torchvision (built for this torch) is not installed")
    import torch

    torch.save(raft_small(weights=None).state_dict(), tmp_path / "raft.pth")
    manifest = write_manifest(tmp_path / "m.jsonl", [line(media / "moving.mp4", 48)])
    score_manifest(manifest, str(tmp_path / "scored.jsonl"),
                   ScoreOptions(motion=MotionOptions(fps=1.0, raft_weights=str(tmp_path / "raft.pth"))),
                   progress=False)
    assert math.isfinite(read(tmp_path / "scored.jsonl")[0]["motion_score"])
