"""No data silently unused (issue 26): a bucket that never fills a global batch is named at encode and at the start
of training, and with data.small_buckets=merge its clips are encoded at the nearest bucket that fills one and
trained on (cache, online mode and synthetic data alike); an encode that writes nothing, an empty cache, a VAE of
the wrong channels and a caption sidecar that is not UTF-8 are each one clear line; `cogvx data info` reports a
cache and a manifest."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from cogvx_mega.cli import EXIT_USER_ERROR, main
from cogvx_mega.config import ConfigError, load_config

# 5x32x64 gets one clip of the media folder (clip_h264.mp4, 72x128): at a global batch of 2 it never fills one
BUCKETS = "data.buckets=[5x32x48,5x32x64,1x32x32]"
BATCH = ["training.micro_batch_size=1", "training.global_batch_size=2"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from diffusers import AutoencoderKLCogVideoX
    from media import make_media_folder
    from text_encoder import make_tiny_t5

    root = tmp_path_factory.mktemp("accounting")
    make_media_folder(root / "media")
    assert main(["data", "scan", str(root / "media"), "--output", str(root / "manifest.jsonl")]) == 0
    for channels in (4, 8):
        AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                               latent_channels=channels).save_pretrained(root / f"vae{channels}")
    make_tiny_t5(root / "t5")
    return root


def encode_args(parts, output, *extra, manifest=None):
    return ["data", "encode", "--manifest", str(manifest or parts / "manifest.jsonl"), "--vae", str(parts / "vae4"),
            "--text-encoder", str(parts / "t5"), "--output", str(output), "--preset", "tiny", BUCKETS, *BATCH,
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def caches(parts):
    """The media folder encoded with data.small_buckets=drop and =merge: (stdout, stderr) of each."""
    import contextlib
    import io

    out = {}
    for policy in ("drop", "merge"):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = main(encode_args(parts, parts / f"{policy}.zarr", f"data.small_buckets={policy}"))
        assert status == 0, stderr.getvalue()[-2000:]
        out[policy] = (stdout.getvalue(), stderr.getvalue())
    return out


def epoch_clips(dataset, global_batch, epochs=3):
    """(bucket, index) of every clip a step draws over `epochs` epochs."""
    per = dataset.batches_per_epoch(global_batch)
    return {(bucket, index) for step in range(epochs * per)
            for bucket, clips in [dataset.batch_of_step(step, global_batch, seed=1)] for index in clips}


def test_drop_names_the_small_bucket_at_encode_and_at_training(parts, caches, caplog):
    from cogvx_mega.data.accounting import training_bucket_table
    from cogvx_mega.tools.training_data import open_training_data

    out, err = caches["drop"]
    assert "5x32x64" in out and "never trained on: 1 clip, fewer than a global batch of 2" in out
    warning = [line for line in err.splitlines() if line.startswith("data.small_buckets=drop")]
    assert len(warning) == 1 and "5x32x64 (1 clip)" in warning[0], err

    config = load_config("tiny", overrides=[f"data.source='{parts / 'drop.zarr'}'", BUCKETS, *BATCH])
    with caplog.at_level(logging.WARNING):
        data = open_training_data(config)
    named = [r.message for r in caplog.records if "data.small_buckets=drop" in r.message]
    assert len(named) == 1 and "5x32x64 (1 clip)" in named[0] and "data.small_buckets=merge" in named[0]
    table = training_bucket_table(data, 2)
    assert "5x32x64" in table and "never trained on" in table and "1 of 6 clips never trained on" in table
    assert {bucket for bucket, _ in epoch_clips(data, 2)} == {"5x32x48", "1x32x32"}  # what drop means


def test_merge_encodes_the_small_bucket_at_the_nearest_size_and_trains_on_it(parts, caches):
    import zarr

    from cogvx_mega.data.cache import read_cache_arrays
    from cogvx_mega.data.cache_reader import CacheDataset

    out, err = caches["merge"]
    assert "merged into 5x32x48 (1 clip)" in out and "every bucket fills a global batch" in out
    assert "data.small_buckets=" not in err  # nothing left out, no warning
    arrays = read_cache_arrays(parts / "merge.zarr")
    assert sorted(arrays) == ["1x32x32", "5x32x48"]
    assert arrays["5x32x48"]["mean"].shape == (4, 4, 2, 4, 6)  # the 72x128 clip encoded at 32x48 (cropped)
    assert arrays["5x32x48"]["paths"][-1].endswith("clip_h264.mp4")  # after the bucket's own clips
    assert zarr.open_group(str(parts / "merge.zarr"), mode="r").attrs["merged"] == {"5x32x64": {"5x32x48": 1}}
    data = CacheDataset(str(parts / "merge.zarr"))
    assert epoch_clips(data, 2) == {(b, i) for b, indices in data.usable.items() for i in indices}  # all 6


def test_online_mode_merges_as_the_cache_does(parts, caches):
    from cogvx_mega.data.cache_reader import CacheDataset
    from cogvx_mega.tools.training_data import open_training_data

    config = load_config("tiny", overrides=[f"data.source='{parts / 'manifest.jsonl'}'", BUCKETS, *BATCH,
                                            f"data.vae='{parts / 'vae4'}'", f"data.text_encoder='{parts / 't5'}'",
                                            "data.small_buckets=merge", "data.num_workers=0"])
    online = open_training_data(config)
    cached = CacheDataset(str(parts / "merge.zarr"))
    try:
        assert online.merged == cached.merged == {"5x32x64": {"5x32x48": 1}}
        assert online.bucket_clips() == {"5x32x48": 4, "1x32x32": 2}
        per = cached.batches_per_epoch(2)
        assert [online.batch_of_step(s, 2, seed=4) for s in range(2 * per)] == \
               [cached.batch_of_step(s, 2, seed=4) for s in range(2 * per)]
    finally:
        online.close()


def synthetic_config(policy, clips=5):
    # in turn over 4 buckets: 9x32x48 gets 2 clips, the others 1 each; at a global batch of 2 only it fills one.
    # 9x48x32 (9 frames) can merge into it, 5x32x48 (5 frames) and 1x32x32 (an image) cannot.
    return load_config("tiny", overrides=["data.buckets=[9x32x48,9x48x32,5x32x48,1x32x32]", *BATCH,
                                          f"data.num_synthetic_clips={clips}", f"data.small_buckets={policy}"])


def test_synthetic_data_merges_and_names_what_cannot_merge(caplog):
    from cogvx_mega.data.accounting import training_bucket_table
    from cogvx_mega.tools.training_data import open_training_data

    with caplog.at_level(logging.WARNING):
        dropped = open_training_data(synthetic_config("drop"))
        merged = open_training_data(synthetic_config("merge"))
    warnings = [r.message for r in caplog.records if "data.small_buckets=" in r.message]
    assert len(warnings) == 2
    assert "3 of 5 clips never trained on" in warnings[0] and "9x48x32 (1 clip)" in warnings[0]
    assert "2 of 5 clips never trained on" in warnings[1] and "9x48x32" not in warnings[1]
    assert "has the frames for them" in warnings[1]
    assert dropped.bucket_clips() == {"9x32x48": 2, "9x48x32": 1, "5x32x48": 1, "1x32x32": 1}
    assert merged.bucket_clips() == {"9x32x48": 3, "5x32x48": 1, "1x32x32": 1}
    assert merged.buckets["9x32x48"][0].shape[1:] == dropped.buckets["9x32x48"][0].shape[1:]
    assert ("9x32x48", 2) in epoch_clips(merged.batches, 2)  # the merged clip is drawn
    table = training_bucket_table(merged, 2)
    assert "merged into 9x32x48 (1 clip)" in table and "holds 1 from 9x48x32" in table


def test_no_bucket_filling_a_batch_and_packed_tables():
    from cogvx_mega.data.accounting import training_bucket_table
    from cogvx_mega.tools.training_data import open_training_data

    with pytest.raises(ConfigError, match="no bucket of the data fills a global batch .* at most 2"):
        open_training_data(synthetic_config("drop", clips=5), global_batch=3)
    packing = load_config("tiny", overrides=["data.buckets=[9x32x48,1x32x32]", "data.num_synthetic_clips=6",
                                             "data.packing=true", "data.pack_tokens=64", *BATCH])
    table = training_bucket_table(open_training_data(packing), 2)
    assert "packed" in table and "packs an epoch" in table and "every clip is in a pack" in table


def test_an_encode_that_would_write_nothing_is_one_line(parts, tmp_path, capsys):
    records = [json.loads(line) for line in (parts / "manifest.jsonl").read_text().splitlines()]
    gone = tmp_path / "gone.jsonl"  # every file moved away since the scan
    gone.write_text("".join(json.dumps(r | {"path": str(tmp_path / f"moved{i}.mp4")}) + "\n"
                            for i, r in enumerate(records)))
    broken = tmp_path / "broken.jsonl"  # the files are there but none decodes
    notes = parts / "media" / "notes.mp4"
    broken.write_text("".join(json.dumps(r | {"path": str(notes)}) + "\n" for r in records if r["kind"] == "video"))
    for manifest, needle in ((gone, f"files of all 6 of its clips are missing ({tmp_path / 'moved'}"),
                             (broken, "none of its 4 clips could be encoded")):
        output = tmp_path / "cache.zarr"
        capsys.readouterr()
        assert main(encode_args(parts, output, "data.num_workers=0", manifest=manifest)) == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("cogvx: error:")]
        assert len(errors) == 1 and needle in errors[0] and errors[0] == err[-1], err
        assert not output.exists()


def test_training_on_an_empty_cache_says_it_holds_no_clips(parts, caches, tmp_path, capsys):
    empty = tmp_path / "empty.zarr"
    shutil.copytree(parts / "drop.zarr", empty)
    for marker in (empty / "commits").glob("*/*.json"):  # as if every clip had failed to encode
        content = json.loads(marker.read_text())
        start = int(marker.stem)
        content["failed"] = [{"index": start + k, "path": "x.mp4", "reason": "broken"} for k in range(content["clips"])]
        marker.write_text(json.dumps(content))
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--data", str(empty), "--run-dir", str(tmp_path / "run"), *BATCH,
                 BUCKETS]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no clips" in err[0] and "global batch" not in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_vae_of_other_channels_is_refused_before_any_clip(parts, tmp_path, capsys, monkeypatch):
    from cogvx_mega.data import cache

    monkeypatch.setattr(cache, "write_shard", lambda *a, **k: pytest.fail("a clip was encoded"))
    args = encode_args(parts, tmp_path / "cache.zarr")
    args[args.index("--vae") + 1] = str(parts / "vae8")
    capsys.readouterr()
    assert main(args) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "8-channel latents" in err[0] and "model.out_channels=4" in err[0], err
    assert not (tmp_path / "cache.zarr").exists()


def test_a_caption_sidecar_that_is_not_utf8_skips_its_clip(tmp_path, capsys):
    from PIL import Image

    media = tmp_path / "media"
    media.mkdir()
    for name, caption in (("good.png", "a red square".encode()), ("latin1.png", "un caf\xe9 rouge".encode("latin-1")),
                          ("bom.png", "\ufeffa green circle".encode("utf-8"))):
        Image.new("RGB", (32, 32), (200, 30, 30)).save(media / name)
        (media / name).with_suffix(".txt").write_bytes(caption)
    manifest = tmp_path / "manifest.jsonl"
    capsys.readouterr()
    assert main(["data", "scan", str(media), "--output", str(manifest), "--workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert "2 clips" in out and "1 skipped" in out
    assert "latin1.png: its caption sidecar latin1.txt is not UTF-8 text (byte 0xe9 at offset 6)" in err, err
    captions = sorted(json.loads(line)["caption"] for line in manifest.read_text().splitlines())
    assert captions == ["a green circle", "a red square"]  # a byte-order mark is dropped
    bad = tmp_path / "captions.jsonl"  # a --captions file that is not UTF-8 is one line
    bad.write_bytes(b'{"path": "good.png", "caption": "caf\xe9"}\n')
    assert main(["data", "scan", str(media), "--output", str(tmp_path / "m2.jsonl"), "--captions", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not UTF-8" in err[0] and not (tmp_path / "m2.jsonl").exists()


def test_data_info_reports_a_cache_and_a_manifest(parts, caches, tmp_path, capsys):
    capsys.readouterr()
    assert main(["data", "info", str(parts / "merge.zarr"), "--preset", "tiny", *BATCH]) == 0
    out = capsys.readouterr().out
    for needle in ("fingerprint", "2 of 2 committed (complete)", "6 usable, 0 failed",
                   "data.small_buckets=merge at a global batch of 2", "4x2x4x6", "merged into 5x32x48"):
        assert needle in out, (needle, out)
    assert main(["data", "info", str(parts / "manifest.jsonl"), "--preset", "tiny", BUCKETS, *BATCH]) == 0
    out = capsys.readouterr().out
    assert "6 clips (4 videos, 2 images)" in out and "never trained on: 1 clip" in out, out
    (tmp_path / "notes.txt").write_text("not a manifest\n")
    for args, needle in (([str(tmp_path / "nothing")], "neither a latent cache"),  # no such path
                         ([str(tmp_path)], "neither a latent cache"),  # a folder that is not a cache
                         ([str(tmp_path / "notes.txt")], "not a manifest: line 1 is not JSON"),
                         ([str(parts / "manifest.jsonl"), "data.small_buckets=keep"], "choose one of drop, merge")):
        assert main(["data", "info", *args, "--preset", "tiny"]) == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
