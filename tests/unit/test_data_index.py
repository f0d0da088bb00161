"""The clip index (`data/index.py`) plans a manifest exactly as the in-memory planner does (`cache.plan_cache`,
the rule of `buckets.assign_bucket` and `merge_small_buckets`), across blocks, parts and row groups, keeps every
column, and refuses a bad line or a damaged part with one line naming it."""
from __future__ import annotations

import json
import random

import pytest

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data import index as clip_index
from cogvx_mega.data.cache import plan_cache

BUCKETS = ["1x32x32", "1x48x32", "5x32x48", "9x32x48", "9x48x32", "13x64x64"]


def random_records(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(count):
        image = rng.random() < 0.3
        record = {"path": f"/media/clip{i:05d}.{'png' if image else 'mp4'}", "caption": f"caption {i} " * rng.randint(1, 30),
                  "kind": "image" if image else "video", "container": "png" if image else "mp4",
                  "codec": "png" if image else "h264", "fps": None if image else rng.choice([8.0, 12.0, 24.0, 30.0]),
                  "frames": 1 if image else rng.randint(1, 120), "width": rng.choice([24, 32, 48, 64, 90]),
                  "height": rng.choice([24, 32, 48, 64]), "motion_score": rng.random()}
        if not image and rng.random() < 0.3:
            record["start"] = round(rng.random() * 2, 3)
            if rng.random() < 0.5:
                record["end"] = record["start"] + round(rng.random() * 3, 3)
        if rng.random() < 0.03:
            record["caption"] = ""
        if rng.random() < 0.02:
            del record["height"]
        records.append({k: v for k, v in record.items() if v is not None})
    return records


def write_manifest(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def usable(records):
    return [r for r in records if r.get("path") and r.get("caption") and r.get("height") and r.get("width")]


@pytest.mark.parametrize("merge_below", [None, 100])
def test_index_plans_as_the_in_memory_planner(tmp_path, monkeypatch, merge_below):
    monkeypatch.setattr(clip_index, "ROW_GROUP_ROWS", 7)  # lookups cross row groups and parts
    records = random_records(900)
    write_manifest(tmp_path / "m.jsonl", records)
    index = clip_index.build_index(tmp_path / "m.jsonl", tmp_path / "index", BUCKETS, 8.0, merge_below,
                                   block_bytes=16 << 10)
    assert len(index.meta["parts"]) > 3
    plan = plan_cache(usable(records), BUCKETS, 8.0, shard_clips=16, merge_below=merge_below)
    assert index.clip_counts() == {b: len(plan.clips[b]) for b in BUCKETS}
    assert index.merged == plan.merged
    if merge_below:
        assert plan.merged  # the test data does have small buckets
    for bucket in BUCKETS:
        expected = [r["path"] for r in plan.clips[bucket]]
        records_of = index.records(bucket)
        assert [r["path"] for r in records_of[:]] == expected
        assert [records_of[i]["path"] for i in range(0, len(expected), 5)] == expected[::5]
        assert [r["path"] for r in records_of[3:40]] == expected[3:40]
    by_path = {r["path"]: r for r in records}
    some = index.records(max(BUCKETS, key=lambda b: index.clip_counts()[b]))[0]
    assert some == by_path[some["path"]]  # every column, absent fields absent
    assert index.skipped == len(records) - len(index) and index.skipped > 0
    reopened = clip_index.ClipIndex.open(tmp_path / "index")
    assert reopened.fingerprint == index.fingerprint


def test_fingerprint_follows_the_manifest_and_the_buckets(tmp_path):
    records = random_records(50, seed=1)
    write_manifest(tmp_path / "m.jsonl", records)
    first = clip_index.build_index(tmp_path / "m.jsonl", tmp_path / "a", BUCKETS, 8.0).fingerprint
    assert clip_index.build_index(tmp_path / "m.jsonl", tmp_path / "b", BUCKETS, 8.0).fingerprint == first
    assert clip_index.build_index(tmp_path / "m.jsonl", tmp_path / "c", BUCKETS[:3], 8.0).fingerprint != first
    write_manifest(tmp_path / "m.jsonl", records[:-1])
    assert clip_index.build_index(tmp_path / "m.jsonl", tmp_path / "d", BUCKETS, 8.0).fingerprint != first


@pytest.mark.parametrize("bad, needle", [('{"path": "a.mp4", "caption": "x"\n', "line 3 is not JSON"),
                                         ('[1, 2]\n', "line 3 is not a JSON object"),
                                         ('{"path": "a.mp4", "caption": "x", "width": "wide"}\n',
                                          "line 3: width='wide' is not a number")])
def test_a_bad_line_is_named(tmp_path, bad, needle):
    lines = [json.dumps(r) + "\n" for r in random_records(4, seed=2)]
    (tmp_path / "m.jsonl").write_text(lines[0] + lines[1] + bad + lines[2])
    with pytest.raises(ConfigError, match=needle):
        clip_index.build_index(tmp_path / "m.jsonl", tmp_path / "index", BUCKETS, 8.0)
    assert not (tmp_path / "index").exists() and [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


def test_a_damaged_or_missing_part_is_named(tmp_path):
    write_manifest(tmp_path / "m.jsonl", random_records(300, seed=3))
    clip_index.build_index(tmp_path / "m.jsonl", tmp_path / "index", BUCKETS, 8.0, block_bytes=16 << 10)
    part = tmp_path / "index" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(ConfigError, match="part-00001.parquet.*damaged"):
        clip_index.ClipIndex.open(tmp_path / "index")
    part.unlink()
    with pytest.raises(ConfigError, match="part-00001.parquet.*missing"):
        clip_index.ClipIndex.open(tmp_path / "index")


def test_index_for_refuses_an_index_built_for_other_buckets(tmp_path):
    write_manifest(tmp_path / "m.jsonl", random_records(30, seed=4))
    clip_index.build_index(tmp_path / "m.jsonl", tmp_path / "index", BUCKETS, 8.0)
    assert clip_index.index_for(tmp_path / "index", BUCKETS, 8.0).clip_counts()
    with pytest.raises(ConfigError, match="built for"):
        clip_index.index_for(tmp_path / "index", BUCKETS, 12.0)
    built = clip_index.index_for(tmp_path / "m.jsonl", BUCKETS, 8.0)  # a manifest: indexed into a temporary folder
    assert built.clip_counts() == clip_index.ClipIndex.open(tmp_path / "index").clip_counts()


def test_data_index_and_info_commands(tmp_path, capsys):
    from cogvx_mega.cli import main

    records = random_records(200, seed=5)
    write_manifest(tmp_path / "m.jsonl", records)
    buckets = "data.buckets=[" + ",".join(BUCKETS) + "]"
    assert main(["data", "index", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "index"), "--preset", "tiny",
                 buckets]) == 0
    plan = plan_cache(usable(records), BUCKETS, 8.0, shard_clips=16)
    assert f"indexed {sum(len(v) for v in plan.clips.values())} clips of 200 manifest lines" in capsys.readouterr().out
    assert main(["data", "info", str(tmp_path / "index"), "--preset", "tiny"]) == 0
    described = capsys.readouterr().out
    for bucket in BUCKETS:
        assert f"{bucket} " in described
    assert main(["data", "index", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "index"), "--preset",
                 "tiny"]) == 2  # exists: --overwrite
    assert "already exists" in capsys.readouterr().err


def test_filters_keep_what_a_hand_filtered_manifest_holds(tmp_path):
    """data.filters at index time: the clips kept are those of the manifest filtered by hand, in the same order,
    each filter's dropped lines counted; an index built once without filters gives the same when filtered."""
    records = random_records(600, seed=6)
    for i, record in enumerate(records):
        record["watermark"] = (i * 37 % 100) / 100
        if i % 50 == 0:
            del record["motion_score"]  # no value: dropped by a filter on it
    write_manifest(tmp_path / "m.jsonl", records)
    filters = [{"column": "motion_score", "min": 0.3}, {"column": "watermark", "max": 0.6}]
    index = clip_index.build_index(tmp_path / "m.jsonl", tmp_path / "filtered", BUCKETS, 8.0, filters=filters,
                                   block_bytes=16 << 10)
    by_hand = [r for r in usable(records) if r.get("motion_score", -1) >= 0.3 and r["watermark"] <= 0.6]
    plan = plan_cache(by_hand, BUCKETS, 8.0, shard_clips=16)
    for bucket in BUCKETS:
        assert [r["path"] for r in index.records(bucket)[:]] == [r["path"] for r in plan.clips[bucket]]
    first = [r for r in usable(records) if not r.get("motion_score", -1) >= 0.3]
    second = [r for r in usable(records) if r.get("motion_score", -1) >= 0.3 and r["watermark"] > 0.6]
    assert index.meta["filter_dropped"] == [len(first), len(second)]
    summary = clip_index.filter_summary(index)
    assert f"motion_score >= 0.3: {len(first)} clips dropped" in summary and f"kept {len(index)} clips" in summary
    clip_index.build_index(tmp_path / "m.jsonl", tmp_path / "all", BUCKETS, 8.0)
    derived = clip_index.index_for(tmp_path / "all", BUCKETS, 8.0, filters=filters)
    assert all(derived.records(b)[:] == index.records(b)[:] for b in BUCKETS)
    assert clip_index.index_for(tmp_path / "all", BUCKETS, 8.0).folder == tmp_path / "all"  # no filters: as built
    with pytest.raises(ConfigError, match="built with data.filters"):
        clip_index.index_for(tmp_path / "filtered", BUCKETS, 8.0, filters=filters[:1])


@pytest.mark.parametrize("column, needle", [("no_such_score", "no line of .* has that column"),
                                            ("caption", "holds string values, not numbers")])
def test_a_filter_on_a_missing_or_text_column_is_one_line(tmp_path, column, needle):
    write_manifest(tmp_path / "m.jsonl", random_records(40, seed=7))
    with pytest.raises(ConfigError, match=needle):
        clip_index.build_index(tmp_path / "m.jsonl", tmp_path / "index", BUCKETS, 8.0,
                               filters=[{"column": column, "min": 1}])
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize("filters, needle", [
    ([{"column": "motion_score", "min": "high"}], r"data.filters\[0\].min='high': use a number"),
    ([{"column": "motion_score"}], "give min, max or both"),
    ([{"column": "motion_score", "min": 2, "max": 1}], "min is above max"),
    ([{"field": "motion_score", "min": 1}], "write a filter as"),
    ({"column": "motion_score"}, "use a list")])
def test_a_bad_filter_in_the_config_is_one_line(filters, needle):
    from cogvx_mega.config import load_config

    with pytest.raises(ConfigError, match=needle):
        load_config("tiny", overrides=[f"data.filters={json.dumps(filters)}"])
