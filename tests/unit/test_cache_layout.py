"""The latent cache layout for hundreds of TB (`data/cache.py`, latent-cache-v2): sharded float16 arrays, text
deduplicated by caption, the clip table in Parquet, and many independent writers.

With a stand-in encoder (deterministic moments, frames and text per clip and caption; no VAE, no T5): a v2 cache
of the same clips takes at most 55% of the v1 bytes at CogVideoX-5B's proportions; every zarr.json stays under
64 KB with 20k clips; the files per shard are as designed (and a million clips make < 5,000 at the default shard
size); shard files are byte for byte zarr-python's and read by tensorstore; each distinct caption is written once
(also when its first clip fails); a value float16 cannot hold refuses its clip (moments) or the shard (text) with
one line; two writers on one shard write it once, each saying so in one line; a cache half written by a crashed
writer is refused by training and finished by the same encode run again; racing creators leave one store; a v1
cache still trains."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data import cache
from cogvx_mega.data.encoder import EncodedClips

HERE = Path(__file__).resolve().parent


class Stub:
    """A stand-in for `ClipEncoder`: moments, first frame and text are functions of the clip's path and caption.
    `fail`: paths that do not decode; `huge`: paths whose mean float16 cannot hold; `huge_text`: captions whose
    embedding it cannot hold; `delay`: seconds per clip; `die_at`: (path, signal) sent to itself when encoding it."""

    def __init__(self, channels=4, text=(4, 8), fail=(), huge=(), huge_text=(), delay=0.0, die_at=None):
        self.channels, self.text_shape = channels, text
        self.fail, self.huge, self.huge_text = set(fail), set(huge), set(huge_text)
        self.delay, self.die_at = delay, die_at

    @staticmethod
    def rng(key: str):
        return np.random.default_rng(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little"))

    def encode_text(self, captions):
        out = np.stack([self.rng("text " + c).standard_normal(self.text_shape).astype(np.float32) for c in captions])
        for k, caption in enumerate(captions):
            if caption in self.huge_text:
                out[k, 0, 0] = 1e5
        return out

    def encode(self, records, bucket, decoded=None):
        latent = (self.channels, 1 + (bucket.frames - 1) // 4, bucket.height // 8, bucket.width // 8)
        moments, failures, frames = [], [], []
        for record in records:
            if self.die_at and record["path"] == self.die_at[0]:
                os.kill(os.getpid(), self.die_at[1])
            time.sleep(self.delay)
            if record["path"] in self.fail:
                moments.append(None), failures.append("broken"), frames.append(None)
                continue
            rng = self.rng(record["path"])
            mean = rng.standard_normal(latent).astype(np.float32)
            if record["path"] in self.huge:
                mean[0, 0, 0, 0] = 1e6
            moments.append((mean, (rng.standard_normal(latent) * 0.3 - 8).astype(np.float32)))
            failures.append(None)
            frames.append(rng.integers(0, 256, (3, bucket.height, bucket.width), dtype=np.uint8))
        return EncodedClips(moments, self.encode_text([r["caption"] for r in records]), failures, frames)


def records(count, bucket="9x16x16", distinct=None, prefix="clip", caption_bytes=0):
    frames, height, width = (int(v) for v in bucket.split("x"))
    pad = "x" * caption_bytes
    out = []
    for i in range(count):
        caption = f"caption {i % distinct if distinct else i}{pad}"
        record = {"path": f"/media/{prefix}{i:06d}.mp4", "caption": caption, "width": width, "height": height}
        out.append(record | ({"kind": "image"} if frames == 1 else {"kind": "video", "fps": 8.0, "frames": frames}))
    return out


def plan_of(items, buckets=("9x16x16",), shard_clips=4):
    return cache.plan_cache(items, list(buckets), 8.0, shard_clips)


def encode_all(store, plan, encoder, channels=4, text=(4, 8), **kwargs):
    cache.create_store(store, plan, channels, *text, {"scaling_factor": 0.7})
    return cache.encode_cache(store, plan, encoder, progress=False, **kwargs)


def array_values(store):
    import zarr

    group = zarr.open_group(str(store), mode="r")
    out = {f"{b}/{n}": np.asarray(group[f"{b}/{n}"][:]) for b in group.attrs["buckets"]
           for n in ("mean", "logvar", "first_frame", "text_row")}
    return out | {"text": np.asarray(group["text"][:])}


def all_files(store):
    return sorted(str(p.relative_to(store)) for p in Path(store).rglob("*") if p.is_file())


def write_v1_store(path, plan, encoder, channels, text_length, text_width):
    """A latent-cache-v1 store as the previous writer made it: float32, one chunk (file) per clip and array (zarr's
    default zstd), text per bucket, the clip table in the root attributes, a marker per shard."""
    import zarr

    from cogvx_mega.data.buckets import Bucket

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    table = []
    for name, items in plan.clips.items():
        bucket = Bucket.parse(name)
        latent = (channels, 1 + (bucket.frames - 1) // 4, bucket.height // 8, bucket.width // 8)
        for array in ("mean", "logvar"):
            group.create_array(f"{name}/{array}", shape=(len(items), *latent), chunks=(1, *latent), dtype="float32",
                               fill_value=0.0)
        group.create_array(f"{name}/text", shape=(len(items), text_length, text_width),
                           chunks=(1, text_length, text_width), dtype="float32", fill_value=0.0)
        group.create_array(f"{name}/first_frame", shape=(len(items), 3, bucket.height, bucket.width),
                           chunks=(1, 3, bucket.height, bucket.width), dtype="uint8", fill_value=0)
        table.extend({"bucket": name, "index": i, "path": r["path"], "caption": r["caption"]}
                     for i, r in enumerate(items))
    group.attrs.update({"format": cache.CACHE_FORMAT_V1, "fingerprint": plan.fingerprint, "clips": table,
                        "buckets": list(plan.clips), "shard_count": len(plan.shards), "merged": {},
                        "scaling_factor": 0.7})
    for shard in plan.shards:
        items = plan.clips[shard.bucket][shard.start:shard.stop]
        encoded = encoder.encode(items, Bucket.parse(shard.bucket))
        failed = []
        for offset, pair in enumerate(encoded.moments):
            index = shard.start + offset
            if pair is None:
                failed.append({"index": index, "path": items[offset]["path"], "reason": encoded.failures[offset]})
                continue
            group[f"{shard.bucket}/mean"][index] = pair[0]
            group[f"{shard.bucket}/logvar"][index] = pair[1]
            group[f"{shard.bucket}/text"][index] = encoded.text[offset]
            group[f"{shard.bucket}/first_frame"][index] = encoded.first_frames[offset]
        (path / shard.marker).parent.mkdir(parents=True, exist_ok=True)
        (path / shard.marker).write_text(json.dumps({"clips": shard.stop - shard.start, "failed": failed}))


def tree_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --- size ---------------------------------------------------------------------------------------------------------

def test_a_v2_cache_takes_at_most_55_percent_of_the_v1_bytes(tmp_path, record_property):
    """CogVideoX-5B at 49x480x720: latent 16x13x60x90, T5 226x4096, first frame 3x480x720 (values per clip
    2,246,400 : 925,696 : 1,036,800). Scaled down 225x in values alike: 49x32x48 (latent 16x13x4x6, frame 3x32x48)
    and text 16x257 (4,112 values, 226*4096/225 = 4,114). Random moments and frames (no compression helps either
    layout), 64 clips with 48 distinct captions."""
    bucket = "49x32x48"
    items = records(64, bucket, distinct=48)
    plan = plan_of(items, [bucket], shard_clips=16)
    encoder = Stub(channels=16, text=(16, 257))
    write_v1_store(tmp_path / "v1.zarr", plan, encoder, 16, 16, 257)
    encode_all(tmp_path / "v2.zarr", plan, encoder, channels=16, text=(16, 257))
    v1, v2 = tree_bytes(tmp_path / "v1.zarr"), tree_bytes(tmp_path / "v2.zarr")
    record_property("v2_over_v1", v2 / v1)
    print(f"v1 {v1} bytes, v2 {v2} bytes: {v2 / v1:.3f}")
    assert v2 <= 0.55 * v1, (v1, v2, v2 / v1)
    unique = encode_all(tmp_path / "v2u.zarr", plan_of(records(64, bucket), [bucket], 16), encoder, 16, (16, 257))
    assert unique["clips"] == 64  # all captions distinct (the v1 bytes hardly change): still under 55%
    print(f"all captions distinct: {tree_bytes(tmp_path / 'v2u.zarr') / v1:.3f}")
    assert tree_bytes(tmp_path / "v2u.zarr") <= 0.55 * v1


def test_zarr_json_stays_small_with_20k_clips(tmp_path):
    items = records(20_000, distinct=15_000, caption_bytes=200)
    plan = plan_of(items, shard_clips=cache.TABLE_ROWS)
    cache.create_store(tmp_path / "c.zarr", plan, 4, 4, 8, {"scaling_factor": 0.7})
    cache.write_shard(tmp_path / "c.zarr", plan, plan.shards[-1], Stub())
    sizes = {str(p.relative_to(tmp_path)): p.stat().st_size for p in (tmp_path / "c.zarr").rglob("zarr.json")}
    assert len(sizes) == 7 and max(sizes.values()) < 64 * 1024, sizes
    assert cache.clip_paths(tmp_path / "c.zarr", "9x16x16", [0, 19_999]) == ["/media/clip000000.mp4",
                                                                            "/media/clip019999.mp4"]
    assert cache.cache_attributes(tmp_path / "c.zarr")["text_rows"] == 15_000


def test_files_per_shard_and_per_million_clips(tmp_path):
    from cogvx_mega.tools.data_encode import DEFAULT_SHARD_CLIPS

    items = records(12, distinct=8)  # shards of 4: captions 0-3 | 4-7 | 0-3 again (nothing new: no text file)
    plan = plan_of(items)
    encode_all(tmp_path / "c.zarr", plan, Stub())
    files = all_files(tmp_path / "c.zarr")
    metadata = [f for f in files if f.endswith("zarr.json") or f.startswith("clips/") or "/text_row/c/" in f]
    assert len(metadata) == 9  # zarr.json x7 (root, bucket, mean, logvar, first_frame, text_row, text), 1+1
    per_shard = {s.number: [f for f in files if f not in metadata and (
        f"/c/{s.number}/" in f or f.endswith(f"/{s.start:09d}.json"))] for s in plan.shards}
    assert [len(v) for v in per_shard.values()] == [6, 6, 5], per_shard  # mean logvar first_frame text claim marker
    assert len(files) == 9 + 17
    shards = -(-1_000_000 // DEFAULT_SHARD_CLIPS)
    per_million = 6 * shards + -(-1_000_000 // cache.TEXT_ROW_CHUNK) + 9
    assert per_million <= 5000, per_million  # 489 shards x 6 + 16 text_row chunks + 9 = 2,959


def test_shard_files_are_zarrs_own_and_tensorstore_reads_them(tmp_path):
    import tensorstore as ts
    import zarr

    items = records(10, distinct=7) + records(5, "1x16x16", prefix="image")
    plan = plan_of(items, ["9x16x16", "1x16x16"], 4)
    store = tmp_path / "c.zarr"
    encode_all(store, plan, Stub(fail={"/media/clip000002.mp4"}))
    group = zarr.open_group(str(store), mode="r")
    again = zarr.open_group(str(tmp_path / "again.zarr"), mode="w", zarr_format=3)
    for name in ["9x16x16/mean", "9x16x16/logvar", "9x16x16/first_frame", "1x16x16/mean", "text"]:
        array = group[name]
        copy = again.create_array(name, shape=array.shape, chunks=array.chunks, shards=array.shards,
                                  dtype=array.dtype, fill_value=array.fill_value, compressors=array.compressors)
        copy[:] = array[:]  # zarr-python writes the same values whole
        ours = {p.relative_to(store / name): p.read_bytes() for p in (store / name / "c").rglob("*") if p.is_file()}
        theirs = {p.relative_to(tmp_path / "again.zarr" / name): p.read_bytes()
                  for p in (tmp_path / "again.zarr" / name / "c").rglob("*") if p.is_file()}
        assert ours == theirs, name
        read = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / name)}}).result()
        assert np.array_equal(np.asarray(read.read().result()), array[:]), name


# --- text rows ---------------------------------------------------------------------------------------------------

def test_assign_text_rows_gives_each_shard_its_first_seen_captions():
    hashes = np.array([5, 6, 5, 7, 6, 8, 8, 9, 5], np.uint64)
    shard_of = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3])
    rows = cache.assign_text_rows(hashes, shard_of, 4)
    assert rows.tolist() == [0, 1, 0, 4, 1, 5, 5, 8, 0]  # shard 3 sees nothing new


def test_each_caption_is_written_once_also_when_its_first_clip_fails(tmp_path):
    import zarr

    items = records(12, distinct=5) + records(6, "1x16x16", prefix="image", distinct=7)  # images: captions 0-5
    broken = "/media/clip000001.mp4"  # the first clip of caption 1
    plan = plan_of(items, ["9x16x16", "1x16x16"], 4)
    store = tmp_path / "c.zarr"
    encoder = Stub(fail={broken})
    encode_all(store, plan, encoder)
    group = zarr.open_group(str(store), mode="r")
    rows = np.concatenate([group[f"{b}/text_row"][:] for b in ("9x16x16", "1x16x16")])
    assert np.unique(rows).size == group.attrs["text_rows"] == 6  # captions 0-4, and 5 first seen in the images
    written = [r for r in range(group["text"].shape[0]) if np.any(group["text"][r])]
    assert sorted(written) == sorted(np.unique(rows).tolist())  # one row per distinct caption
    arrays = cache.read_cache_arrays(store)
    for bucket, values in arrays.items():
        captions = {r["path"]: r["caption"] for r in plan.clips[bucket]}
        expected = encoder.encode_text([captions[p] for p in values["paths"]])
        assert np.array_equal(values["text"], cache.stored(expected)), bucket
    assert broken not in arrays["9x16x16"]["paths"]
    assert "/media/clip000006.mp4" in arrays["9x16x16"]["paths"]  # caption 1 again: its text was still written


# --- float16 -----------------------------------------------------------------------------------------------------

def test_a_value_float16_cannot_hold_refuses_its_clip_or_shard_in_one_line(tmp_path, caplog):
    from cogvx_mega.data.cache_reader import CacheDataset

    huge = "/media/clip000005.mp4"
    plan = plan_of(records(8))
    store = tmp_path / "c.zarr"
    with caplog.at_level(logging.WARNING, logger="cogvx_mega.data.cache"):
        counts = encode_all(store, plan, Stub(huge={huge}))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"skipped {huge}: its VAE posterior mean reaches 1e+06, beyond "
                                                   f"float16's range"), lines
    assert counts["failed"] == 1
    data = CacheDataset(str(store))
    assert 5 not in list(data.usable["9x16x16"]) and len(data.usable["9x16x16"]) == 7
    assert np.isfinite(cache.read_cache_arrays(store)["9x16x16"]["mean"]).all()
    assert cache.float16_problem(np.array([np.nan])) == "holds NaN or infinity"

    bad = tmp_path / "text.zarr"
    with pytest.raises(ConfigError) as error:
        encode_all(bad, plan, Stub(huge_text={"caption 6"}))
    message = str(error.value)
    assert "\n" not in message and "/media/clip000006.mp4" in message and "float16" in message, message
    assert "shard 9x16x16/000000004 is not committed" in message
    assert sorted(cache.committed(bad)) == ["commits/9x16x16/000000000.json"]
    assert not (bad / "9x16x16" / "mean" / "c" / "1").exists()  # the shard's files went
    claim = json.loads((bad / "claims" / "9x16x16" / "000000004.json").read_text())
    assert claim["released"]  # the next writer takes it at once
    encode_all(bad, plan, Stub())  # the same encode with a fixed encoder finishes it
    assert len(cache.committed(bad)) == 2


# --- many writers ------------------------------------------------------------------------------------------------

def test_a_live_claim_is_skipped_and_a_dead_one_taken_over_one_line_each(tmp_path, caplog):
    from cogvx_mega.data.cache_reader import CacheDataset

    plan = plan_of(records(12))
    straight = tmp_path / "straight.zarr"
    encode_all(straight, plan, Stub())
    store = tmp_path / "c.zarr"
    cache.create_store(store, plan, 4, 4, 8, {"scaling_factor": 0.7})
    other = subprocess.Popen(["sleep", "60"])  # another writer on this machine, alive
    try:
        held = {"host": "here", "job": 1, "jobs": 2, "rank": 0, "machine": cache._machine(), "pid": other.pid}
        claims = store / "claims" / "9x16x16"
        claims.mkdir(parents=True)
        (claims / "000000004.json").write_text(json.dumps(held))
        with caplog.at_level(logging.WARNING, logger="cogvx_mega.data.cache"):
            counts = cache.encode_cache(store, plan, Stub(), progress=False)
        lines = [r.getMessage() for r in caplog.records]
        assert lines == [f"shard 9x16x16/000000004 (4 clips) is being written by here pid {other.pid}, job 1 of 2 "
                         f"(heartbeat 0 s ago); skipping it"], lines
        assert counts["left"] == ["9x16x16/000000004"] and counts["shards"] == 2
        with pytest.raises(ConfigError, match="2 of 3 shards are committed"):
            CacheDataset(str(store))
    finally:
        other.kill()
        other.wait()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cogvx_mega.data.cache"):
        counts = cache.encode_cache(store, plan, Stub(), progress=False)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"shard 9x16x16/000000004 (4 clips) was claimed by here pid {other.pid}, job 1 of 2, whose "
                     f"process has ended; taking it over"], lines
    assert counts["shards"] == 1 and (claims / "000000004.1.json").is_file()
    values, expected = array_values(store), array_values(straight)
    assert all(np.array_equal(values[k], expected[k]) for k in expected)
    assert cache.committed(store) == cache.committed(straight)

    # another machine's claim: alive while its heartbeat is recent, taken over once it stopped --claim-timeout ago
    far = tmp_path / "far.zarr"
    cache.create_store(far, plan, 4, 4, 8, {"scaling_factor": 0.7})
    (far / "claims" / "9x16x16").mkdir(parents=True)
    claim = far / "claims" / "9x16x16" / "000000000.json"
    claim.write_text(json.dumps({"host": "node7", "pid": 1234, "machine": "node7|x|y", "job": 0, "jobs": 1}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cogvx_mega.data.cache"):
        assert cache.encode_cache(far, plan, Stub(), progress=False, claim_timeout=600)["left"] == [
            "9x16x16/000000000"]
        os.utime(claim, (time.time() - 3600, time.time() - 3600))
        assert cache.encode_cache(far, plan, Stub(), progress=False, claim_timeout=600)["shards"] == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "node7 pid 1234" in lines[0] and "skipping it" in lines[0], lines
    assert lines[1] == ("shard 9x16x16/000000000 (4 clips) was claimed by node7 pid 1234, whose heartbeat stopped "
                        "60 min ago (--claim-timeout 600 s); taking it over"), lines


WRITER = """
import logging, sys
from pathlib import Path
from test_cache_layout import Stub, plan_of, records
from cogvx_mega.data import cache
logging.basicConfig(level=logging.WARNING, format="%(message)s")
args = sys.argv[1:]
plan = plan_of(records(int(args[1])), shard_clips=4)
store = Path(args[0])
cache.create_store(store, plan, 4, 4, 8, {"scaling_factor": 0.7})
die = (args[3], 9) if len(args) > 3 else None
counts = cache.encode_cache(store, plan, Stub(delay=float(args[2]), die_at=die), progress=False)
print("shards", counts["shards"], "left", len(counts["left"]))
"""


def run_writers(store, clips, delay, count=1, die_at=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]), "TQDM_DISABLE": "1"}
    extra = [die_at] if die_at else []
    children = [subprocess.Popen([sys.executable, "-c", WRITER, str(store), str(clips), str(delay), *extra], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]
    return [(child.wait(timeout=240), *child.communicate()) for child in children]


def test_two_encodes_writing_the_same_shards_write_each_once(tmp_path):
    plan = plan_of(records(48))
    straight = tmp_path / "straight.zarr"
    encode_all(straight, plan, Stub())
    store = tmp_path / "c.zarr"
    outcomes = run_writers(store, 48, 0.02, count=2)  # both take every shard, at the same time
    written = 0
    for status, out, err in outcomes:
        assert status == 0, err
        shards, left = int(out.split()[1]), int(out.split()[3])
        lines = err.strip().splitlines() if err.strip() else []
        assert len(lines) == left and all("is being written by" in line and "skipping it" in line
                                          for line in lines), err  # one line per shard left to the other
        written += shards
    assert written == 12  # every shard once
    assert sorted(p.name for p in (store / "claims" / "9x16x16").iterdir()) == [f"{4 * i:09d}.json"
                                                                                for i in range(12)]  # no takeover
    values, expected = array_values(store), array_values(straight)
    assert all(np.array_equal(values[k], expected[k]) for k in expected)
    assert cache.committed(store) == cache.committed(straight)


def test_a_cache_half_written_by_a_crashed_writer_is_refused_then_finished(tmp_path, caplog):
    from cogvx_mega.config import load_config
    from cogvx_mega.data.cache_reader import CacheDataset
    from cogvx_mega.data.info import describe_data

    clips = 4 * 6
    plan = plan_of(records(clips))
    straight = tmp_path / "straight.zarr"
    encode_all(straight, plan, Stub())
    store = tmp_path / "c.zarr"
    [(status, out, err)] = run_writers(store, clips, 0.0, die_at="/media/clip000010.mp4")  # killed in shard 2
    assert status == -signal.SIGKILL, err
    assert sorted(cache.committed(store)) == [f"commits/9x16x16/{s:09d}.json" for s in (0, 4)]
    # claimed, never committed: the shard it was writing, and the next one (claimed as its decoding began)
    assert sorted(p.name for p in (store / "claims" / "9x16x16").iterdir())[2:] == ["000000008.json", "000000012.json"]
    with pytest.raises(ConfigError) as error:
        CacheDataset(str(store))
    assert "2 of 6 shards are committed" in str(error.value) and "\n" not in str(error.value)
    report = describe_data(str(store), load_config("tiny", overrides=["data.buckets=[9x16x16]"]))
    assert "2 of 6 committed (unfinished" in report
    with caplog.at_level(logging.WARNING, logger="cogvx_mega.data.cache"):
        counts = cache.encode_cache(store, plan, Stub(), progress=False)  # the same encode again
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    for line, start in zip(lines, (8, 12)):
        assert line.startswith(f"shard 9x16x16/{start:09d} (4 clips) was claimed by") and \
            line.endswith("whose process has ended; taking it over"), lines
    assert counts["shards"] == 4
    values, expected = array_values(store), array_values(straight)
    assert all(np.array_equal(values[k], expected[k]) for k in expected)
    assert not [f for f in all_files(store) if "/." in f"/{f}"]  # no temporary file left
    assert len(CacheDataset(str(store)).usable["9x16x16"]) == clips


def test_racing_creators_leave_one_store(tmp_path, monkeypatch, caplog):
    plan, other_plan = plan_of(records(8)), plan_of(records(9))
    real = cache._create_arrays

    def another_creator_first(store, its_plan):
        def create(path, *args):  # another job's rank 0 renames its store into place meanwhile
            real(path, *args)
            monkeypatch.setattr(cache, "_create_arrays", real)
            assert cache.create_store(store, its_plan, 4, 4, 8, {"scaling_factor": 0.7}) is True
        monkeypatch.setattr(cache, "_create_arrays", create)

    another_creator_first(tmp_path / "c.zarr", plan)
    with caplog.at_level(logging.INFO, logger="cogvx_mega.data.cache"):
        assert cache.create_store(tmp_path / "c.zarr", plan, 4, 4, 8, {"scaling_factor": 0.7}) is False
    assert "another encode created" in caplog.text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the loser's build is gone
    assert cache.cache_attributes(tmp_path / "c.zarr")["fingerprint"] == plan.fingerprint
    another_creator_first(tmp_path / "d.zarr", other_plan)
    with pytest.raises(ConfigError, match="already holds another cache"):  # the winner's plan is another: one line
        cache.create_store(tmp_path / "d.zarr", plan, 4, 4, 8, {"scaling_factor": 0.7})


def test_jobs_take_disjoint_shards_and_a_slurm_array_is_a_set_of_jobs(monkeypatch):
    from cogvx_mega.tools.data_encode import resolve_jobs

    plan = plan_of(records(4 * 23))
    taken = [s for job in range(3) for rank in range(2) for s in cache.shards_of(plan, job, 3, rank, 2)]
    assert sorted(taken, key=lambda s: s.number) == plan.shards
    assert resolve_jobs(None, None) == (0, 1)
    for name, value in {"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_STEP": "2",
                        "SLURM_ARRAY_TASK_COUNT": "4"}.items():
        monkeypatch.setenv(name, value)
    assert resolve_jobs(None, None) == (2, 4)
    assert resolve_jobs(3, 1) == (1, 3)  # the flags win
    for jobs, job, needle in ((2, 2, "use 0 to 1"), (None, 1, "together"), (0, 0, "positive")):
        with pytest.raises(ConfigError, match=needle):
            resolve_jobs(jobs, job)


# --- v1 ------------------------------------------------------------------------------------------------------------

def test_a_v1_cache_still_trains_and_is_not_extended(tmp_path):
    import torch
    import zarr

    from cogvx_mega.config import load_config
    from cogvx_mega.data.cache_reader import CacheDataset
    from cogvx_mega.data.info import describe_data
    from cogvx_mega.diffusion.randomness import Stream, slot_normal

    plan = plan_of(records(8), shard_clips=4)
    store = tmp_path / "v1.zarr"
    write_v1_store(store, plan, Stub(fail={"/media/clip000003.mp4"}), 4, 4, 8)
    data = CacheDataset(str(store))
    assert len(data.usable["9x16x16"]) == 7
    bucket, clips = data.batch_of_step(0, 2, seed=3)
    batch = data.step_batch(0, range(2), 2, seed=3)
    group = zarr.open_group(str(store), mode="r")
    mean = torch.from_numpy(group[f"{bucket}/mean"].oindex[clips])
    noise = slot_normal(mean.shape[1:], range(2), seed=3, step=0, stream=Stream.VAE_POSTERIOR)
    std = torch.exp(0.5 * torch.from_numpy(group[f"{bucket}/logvar"].oindex[clips]))
    assert torch.allclose(batch["latents"], ((mean + std * noise) * 0.7).permute(0, 2, 1, 3, 4), atol=1e-6)
    assert torch.equal(batch["text_embeds"], torch.from_numpy(group[f"{bucket}/text"].oindex[clips]))
    assert cache.read_cache_arrays(store)["9x16x16"]["paths"][3] == "/media/clip000004.mp4"
    report = describe_data(str(store), load_config("tiny", overrides=["data.buckets=[9x16x16]"]))
    assert cache.CACHE_FORMAT_V1 in report and "7 usable, 1 failed" in report
    with pytest.raises(ConfigError) as error:
        cache.check_output(store, plan, overwrite=False)
    assert "training still reads but this version does not extend" in str(error.value)
