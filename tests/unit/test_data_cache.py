"""`cogvx data encode`: a manifest of real clips into a zarr latent cache; an encode killed mid-way and
resumed (with another number of decode threads) equals an uninterrupted one array for array, and training
refuses the unfinished cache; broken clips are skipped and counted; bad input is one line with nothing
written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from cogvx_mega.cli import EXIT_USER_ERROR, main

BUCKETS = "data.buckets=[5x32x48,1x32x32]"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from diffusers import AutoencoderKLCogVideoX
    from media import make_media_folder
    from text_encoder import make_tiny_t5

    root = tmp_path_factory.mktemp("cache-parts")
    make_media_folder(root / "media")
    manifest = root / "manifest.jsonl"
    assert main(["data", "scan", str(root / "media"), "--output", str(manifest)]) == 0
    lines = manifest.read_text().splitlines()
    gone = json.loads(lines[0]) | {"path": str(root / "media" / "deleted.mp4")}  # its file is gone
    manifest.write_text("\n".join([*lines, json.dumps(gone)]) + "\n")
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=4).save_pretrained(root / "vae")
    make_tiny_t5(root / "t5")
    return root


def encode_args(parts, output, *extra):
    return ["data", "encode", "--manifest", str(parts / "manifest.jsonl"), "--vae", str(parts / "vae"),
            "--text-encoder", str(parts / "t5"), "--output", str(output), "--preset", "tiny", BUCKETS,
            "--shard-clips", "1", *extra]


def arrays(store):
    import zarr

    group = zarr.open_group(str(store), mode="r")
    out = {f"{bucket}/{name}": np.asarray(group[f"{bucket}/{name}"][:]) for bucket in group.attrs["buckets"]
           for name in ("mean", "logvar", "first_frame", "text_row")}
    return out | {"text": np.asarray(group["text"][:])}


# Run in a fresh interpreter: DALI's worker threads do not survive a fork of a process that has used DALI.
KILL_AFTER_SHARDS = """
import os, signal, sys
from cogvx_mega.data import cache
from cogvx_mega.cli import main
real, done = cache.write_shard, []
def write_then_maybe_die(*a, **k):
    marker = real(*a, **k)
    done.append(marker)
    if len(done) == {shards}:
        os.kill(os.getpid(), signal.SIGKILL)  # the moment after a commit, before the next shard
    return marker
cache.write_shard = write_then_maybe_die
main(sys.argv[1:])
"""


def test_encode_then_kill_and_resume_equals_one_encode(parts, tmp_path, capsys):
    from cogvx_mega.data.cache import committed, read_cache_arrays

    straight = tmp_path / "straight.zarr"
    assert main(encode_args(parts, straight)) == 0
    out, err = capsys.readouterr()
    assert "skipped" in err and "deleted.mp4" in err  # the manifest line whose file is gone
    usable = read_cache_arrays(straight)
    assert sorted(usable) == ["1x32x32", "5x32x48"]
    assert usable["5x32x48"]["mean"].shape[1:] == (4, 2, 4, 6) and usable["1x32x32"]["mean"].shape[1:] == (4, 1, 4, 4)
    assert usable["5x32x48"]["text"].shape[1:] == (16, 32)
    assert len(usable["5x32x48"]["paths"]) == 4 and len(usable["1x32x32"]["paths"]) == 2

    killed = tmp_path / "killed.zarr"
    child = subprocess.run([sys.executable, "-c", KILL_AFTER_SHARDS.format(shards=2), *encode_args(parts, killed)],
                           capture_output=True, text=True, timeout=240, env={**os.environ, "TQDM_DISABLE": "1"})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert len(committed(killed)) == 2  # the rest was never committed
    from cogvx_mega.config.errors import ConfigError
    from cogvx_mega.data.cache_reader import CacheDataset

    with pytest.raises(ConfigError, match="2 of 7 shards are committed"):  # training would see a moving order
        CacheDataset(str(killed))
    # the same command resumes; here decoding in the calling thread (the straight encode used 4 decode threads)
    assert main(encode_args(parts, killed, "data.num_workers=0")) == 0
    expected, resumed = arrays(straight), arrays(killed)
    assert sorted(expected) == sorted(resumed)
    for key in expected:
        assert np.array_equal(expected[key], resumed[key]), key
    assert committed(killed) == committed(straight)


def test_encode_bad_input_is_one_line_and_writes_nothing(parts, tmp_path, capsys):
    output = tmp_path / "cache.zarr"
    for args, needle in [
        (encode_args(parts, output)[:4] + ["--vae", str(tmp_path / "no-vae")] + encode_args(parts, output)[6:], "no-vae"),
        (encode_args(parts, output)[:6] + ["--text-encoder", str(tmp_path / "no-t5")] + encode_args(parts, output)[8:],
         "nothing is downloaded"),
        (["data", "encode", "--manifest", str(tmp_path / "none.jsonl")] + encode_args(parts, output)[4:], "none.jsonl"),
    ]:
        capsys.readouterr()
        status = main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert status == EXIT_USER_ERROR and len(lines) == 1 and needle in lines[0], (needle, lines)
        assert not output.exists()
    output.mkdir()
    (output / "something").write_text("not a cache")
    capsys.readouterr()
    assert main(encode_args(parts, output)) == EXIT_USER_ERROR
    assert "not a latent cache" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == ["something"]


def test_two_jobs_write_the_cache_one_job_writes(parts, tmp_path, capsys):
    from cogvx_mega.config import load_config
    from cogvx_mega.config.errors import ConfigError
    from cogvx_mega.data.cache import committed
    from cogvx_mega.data.cache_reader import CacheDataset
    from cogvx_mega.tools.data_encode import encode_manifest

    config = load_config("tiny", overrides=[BUCKETS, "data.num_workers=0"])

    def encode(output, **jobs):
        return encode_manifest(config, str(parts / "manifest.jsonl"), str(parts / "vae"), str(parts / "t5"),
                               str(output), shard_clips=1, device="cpu", **jobs)

    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    encode(one)
    assert encode(two, jobs=2, job=1)["shards"] == 3  # shards 1, 3, 5 of 7
    assert "3 of 7 shards are committed" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="3 of 7 shards are committed"):
        CacheDataset(str(two))
    assert encode(two, jobs=2, job=0)["shards"] == 4  # the other job, later: the cache is whole
    expected, written = arrays(one), arrays(two)
    assert sorted(expected) == sorted(written)
    for key in expected:
        assert np.array_equal(expected[key], written[key]), key
    assert committed(two) == committed(one)
    with pytest.raises(ConfigError, match="--overwrite"):  # each job would remove what the others write
        encode(two, jobs=2, job=0, overwrite=True)
