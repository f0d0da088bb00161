"""Images at 2B scale (issue 27, item 4): webdataset/img2dataset tar shards indexed one row per shard, read by online
mode's reader from inside the tars and mixed with videos at data.image_ratio; training on videos + a tar of images
gives the losses of the same videos and images given as one plain manifest of files."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cogvx_mega.cli import EXIT_USER_ERROR, main
from cogvx_mega.config import ConfigError, load_config

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny-images.yaml")
# (shard, image size (height, width), with img2dataset's .json sidecars); sorted file names follow the tar order
SHARDS = [("a", (40, 40), True), ("b", (36, 54), False), ("c", (40, 40), True)]
IMAGES_PER_SHARD = 4


def picture(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), rng.integers(0, 60), np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top:top + height // 3, left:left + width // 3] = rng.integers(60, 255, size=3)
    return image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Videos and images as files (with sidecar captions), the same images in webdataset tars (plus a key with
    no caption and a tar that is not one), manifests of both, a tiny VAE and T5."""
    import webdataset
    from PIL import Image

    from cogvx_mega.data.tiny_models import caption_corpus, make_tiny_t5, make_tiny_vae
    from media import moving_square, write_video

    root = tmp_path_factory.mktemp("image-shards")
    videos, images, tars = root / "media" / "videos", root / "media" / "images", root / "tars"
    for folder in (videos, images, tars):
        folder.mkdir(parents=True)
    captions = iter(caption_corpus(60))
    for number, (height, width) in enumerate([(32, 48), (48, 72), (40, 60), (32, 48)]):
        path = videos / f"clip{number}.mp4"
        write_video(path, moving_square(9, height, width, seed=number), 8, "libx264", "yuv420p")
        path.with_suffix(".txt").write_text(next(captions) + "\n")
    for shard_number, (shard, (height, width), sidecars) in enumerate(SHARDS):
        with webdataset.TarWriter(str(tars / f"{shard}-{shard_number:05d}.tar")) as writer:
            for number in range(IMAGES_PER_SHARD):
                buffer = io.BytesIO()
                Image.fromarray(picture(shard_number * 10 + number, height, width)).save(buffer, format="PNG")
                caption = next(captions)
                key = f"{shard}{number:03d}"
                (images / f"{key}.png").write_bytes(buffer.getvalue())  # the same bytes as a file of its own
                (images / f"{key}.txt").write_text(caption + "\n")
                sample = {"__key__": key, "png": buffer.getvalue(), "txt": caption}
                if sidecars:
                    sample["json"] = {"width": width, "height": height, "original_width": 2 * width}
                writer.write(sample)
            if shard == "a":  # an image without a caption: neither counted nor trained on
                writer.write({"__key__": "a999", "png": buffer.getvalue()})
    (tars / "broken-00009.tar").write_text("not a tar at all\n" * 100)
    for name, folder in (("videos.jsonl", videos), ("all.jsonl", root / "media")):
        assert main(["data", "scan", str(folder), "--output", str(root / name)]) == 0
    make_tiny_vae(root / "vae")
    make_tiny_t5(root / "t5")
    return root


@pytest.fixture(scope="module")
def index(corpus):
    assert main(["data", "index-images", str(corpus / "tars"), "--output", str(corpus / "images-index"),
                 "--workers", "2"]) == 0
    return corpus / "images-index"


def online_args(corpus, manifest, *extra):
    return ["--config", EXAMPLE, "--data", str(corpus / manifest), "--vae", str(corpus / "vae"), "--text-encoder",
            str(corpus / "t5"), *extra]


def config_of(corpus, manifest, *overrides):
    return load_config(config_file=EXAMPLE, overrides=[f"data.source='{corpus / manifest}'",
                                                       f"data.vae='{corpus / 'vae'}'",
                                                       f"data.text_encoder='{corpus / 't5'}'", *overrides])


def frames_of(bucket: str) -> int:
    return int(bucket.split("x")[0])


def test_one_row_per_shard_and_an_unreadable_tar_is_skipped_and_counted(corpus, tmp_path, capsys):
    import pyarrow.parquet as pq

    out = tmp_path / "index"
    assert main(["data", "index-images", str(corpus / "tars"), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and "broken-00009.tar" in skipped[0] and "not a readable tar" in skipped[0]
    assert "indexed 3 shards (12 images)" in captured.out and "1 tar(s) skipped" in captured.out
    rows = pq.read_table(out / "shards.parquet").to_pylist()
    assert [Path(r["path"]).name for r in rows] == ["a-00000.tar", "b-00001.tar", "c-00002.tar"]
    assert [r["count"] for r in rows] == [IMAGES_PER_SHARD] * 3  # a999 has no caption
    assert [(r["height"], r["width"]) for r in rows] == [size for _, size, _ in SHARDS]  # .json, headers, .json
    assert [r["image_sizes"] for r in rows] == [1, 1, 1]
    meta = json.loads((out / "index.json").read_text())
    assert (meta["format"], meta["shards"], meta["images"], meta["skipped"]) == \
           ("cogvx-mega/image-shards-v1", 3, 12, 1)
    assert main(["data", "index-images", str(corpus / "tars"), "--output", str(out)]) == EXIT_USER_ERROR
    assert "--overwrite" in capsys.readouterr().err


def test_an_image_decodes_from_the_tar_as_from_its_file(corpus, index):
    from cogvx_mega.data.decode import DecodeSpec, decode_clip
    from cogvx_mega.data.image_shards import ImageShardIndex
    from cogvx_mega.data.manifest import MediaError

    shards = ImageShardIndex.open(index)
    spec = DecodeSpec(frames=1, height=32, width=48)
    for row, number in ((0, 0), (1, 3), (2, 1)):
        record = shards.record(row, number)
        key = record["member"].split(".")[0]
        assert record["caption"] == (corpus / "media" / "images" / f"{key}.txt").read_text().strip()
        from_file = decode_clip({"path": str(corpus / "media" / "images" / f"{key}.png"), "kind": "image"}, spec)
        assert torch.equal(decode_clip(record, spec), from_file)
    # a member that does not decode is a MediaError, which online mode skips and replaces like a broken video
    record = shards.record(0, 0)
    with pytest.raises(MediaError, match="not a readable image"):
        decode_clip({**record, "offset": record["offset"] + 1}, spec)
    with pytest.raises(MediaError, match="the tar ends inside a000.png"):
        decode_clip({**record, "size": 10 ** 6}, spec)


def test_the_tar_header_reader_agrees_with_tarfile(corpus, tmp_path):
    import tarfile

    from cogvx_mega.data.image_shards import _raw_members, _tarfile_members, read_shard

    webdataset_tar = corpus / "tars" / "a-00000.tar"  # pax headers (webdataset writes each member's mtime so)
    long_path = f"{'d' * 80}/{'e' * 60}/x000"  # a ustar prefix field
    for layout in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT):
        tar_path = tmp_path / f"layout{layout}.tar"
        with tarfile.open(tar_path, "w", format=layout) as tar:
            for name, data in ((f"{long_path}.png", (corpus / "media" / "images" / "a000.png").read_bytes()),
                               (f"{long_path}.txt", b"a long way down\n"), ("x001.jpg", b"not read"),
                               ("x001.txt", b"  \n")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        raw = _raw_members(tar_path)
        if layout == tarfile.GNU_FORMAT:  # a GNU long name: read by tarfile instead
            assert raw is None
        else:
            assert [m[:3] for m in raw] == [m[:3] for m in _tarfile_members(tar_path)]
        members = read_shard(tar_path)
        assert members.names == [f"{long_path}.png"]  # x001 has a blank caption
    raw = _raw_members(webdataset_tar)
    assert raw is not None and [m[:3] for m in raw] == [m[:3] for m in _tarfile_members(webdataset_tar)]


def losses_of(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_videos_and_a_tar_of_images_train_as_one_plain_manifest(corpus, index, tmp_path, monkeypatch):
    """The Must-show: each image step's images come from the tar, at the configured ratio, and the losses are those
    of the same videos and images listed as files in one manifest."""
    import threading

    from cogvx_mega.data import decode, image_shards, online
    from cogvx_mega.tools.training_data import open_training_data

    runs = {"tar": ("videos.jsonl", [f"data.images={index}"]), "files": ("all.jsonl", [])}
    for name, (manifest, extra) in runs.items():
        assert main(["train", *online_args(corpus, manifest, "--run-dir", str(tmp_path / name), *extra)]) == 0
    from_tar, from_files = losses_of(tmp_path / "tar"), losses_of(tmp_path / "files")
    assert len(from_tar) == 8
    assert max(abs(a - b) / abs(b) for a, b in zip(from_tar, from_files)) <= 1e-6, (from_tar, from_files)

    read = []  # what each step decodes (no worker threads: a step decodes its own clips, each once)
    original = decode.open_media
    monkeypatch.setattr(decode, "open_media", lambda record: read.append(decode.media_name(record)) or
                        original(record))
    noise_steps = []  # the step each posterior sample's noise is keyed on
    shard_reads = []  # the thread that read each tar's headers
    read_shard = image_shards.read_shard
    monkeypatch.setattr(image_shards, "read_shard", lambda *args, **kwargs: shard_reads.append(
        threading.current_thread().name) or read_shard(*args, **kwargs))
    posterior = online.posterior_latents
    monkeypatch.setattr(online, "posterior_latents", lambda *args: noise_steps.append(args[4]) or posterior(*args))
    mixed = open_training_data(config_of(corpus, "videos.jsonl", f"data.images='{index}'", "data.num_workers=0"))
    plain = open_training_data(config_of(corpus, "all.jsonl", "data.num_workers=0"))
    try:
        steps, decoded = 12, set()
        assert [mixed.is_image_step(s) for s in range(steps)] == [s % 2 == 1 for s in range(steps)]  # ratio 0.5
        for step in range(steps):
            bucket, clips = mixed.batch_of_step(step, 2, seed=0)
            assert (frames_of(bucket) == 1) == mixed.is_image_step(step)
            read.clear()
            batch = mixed.step_batch(step, range(2), 2, seed=0)
            mine = list(read)
            expected = plain.step_batch(step, range(2), 2, seed=0)
            for key in ("latents", "text_embeds"):
                assert torch.equal(batch[key], expected[key]), (step, key)
            if mixed.is_image_step(step):
                members = {decode.media_name(mixed.images.plan.clips[bucket][i]) for i in clips}
                assert all(".tar:" in name and name.endswith(".png") for name in members)
                assert set(mine) == members - decoded, (step, mine)  # from the tar, nothing else
                assert batch["latents"].shape[1] == 1  # one latent frame: an image
            else:
                assert all(name.endswith(".mp4") for name in mine), (step, mine)
            decoded |= set(mine)
        assert sum(".tar:" in name for name in decoded) == 12  # every image of the tars, over an epoch and more
        # each stream numbers its own steps for its order, but the noise is keyed on the training step: image step
        # 1 and video step 0 both read their stream's first batch, with the noise of steps 1 and 0 (each step twice
        # here: the mix, then the plain manifest)
        assert noise_steps == [s for s in range(steps) for _ in (0, 1)]
        # the tars' headers are read ahead, in the background, for the next image steps: no step waits on them
        assert len(shard_reads) == 3 and all(name.startswith("cogvx-image-shards") for name in shard_reads)
    finally:
        mixed.close()
        plain.close()


def test_image_steps_come_at_the_configured_ratio_from_each_stream(corpus, index):
    from cogvx_mega.tools.training_data import open_training_data

    data = open_training_data(config_of(corpus, "videos.jsonl", f"data.images='{index}'", "data.image_ratio=0.3"))
    try:
        steps = 1000
        image_steps = [s for s in range(steps) if data.is_image_step(s)]
        assert len(image_steps) == 300
        assert max(np.diff(image_steps)) <= 4 and min(np.diff(image_steps)) >= 3  # spread evenly (1 in 3.33)
        seen = {True: [], False: []}
        for step in range(steps):
            bucket, clips = data.batch_of_step(step, 2, seed=7)
            seen[data.is_image_step(step)].append(bucket)
        assert {frames_of(b) for b in seen[True]} == {1} and {frames_of(b) for b in seen[False]} == {5}
        # each stream walks its own epochs: the image stream's 6 batches an epoch, in proportion to the buckets
        assert seen[True].count("1x32x32") == 2 * seen[True].count("1x32x48")
    finally:
        data.close()


def test_a_tar_truncated_after_indexing_is_one_clear_error(corpus, index, tmp_path, capsys):
    shutil.copytree(corpus / "tars", tmp_path / "tars")
    (tmp_path / "tars" / "broken-00009.tar").unlink()
    assert main(["data", "index-images", str(tmp_path / "tars"), "--output", str(tmp_path / "index")]) == 0
    victim = tmp_path / "tars" / "b-00001.tar"
    victim.write_bytes(victim.read_bytes()[:3000])
    capsys.readouterr()
    code = main(["train", *online_args(corpus, "videos.jsonl", "--run-dir", str(tmp_path / "run"), "--steps", "12",
                                       f"data.images={tmp_path / 'index'}")])  # 12 steps: every image once
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == EXIT_USER_ERROR and "b-00001.tar" in err[-1] and "index the shards again" in err[-1], err


def test_config_checks_of_the_mix():
    for overrides, field in ((["data.image_ratio=1.5"], "data.image_ratio"),
                             (["data.images=somewhere"], "data.images"),
                             (["data.image_ratio=0.5", "data.buckets=[5x32x48]"], "data.buckets"),
                             (["data.image_ratio=0.5", "data.buckets=[1x32x32]"], "data.buckets"),
                             (["data.image_ratio=0.5", "data.buckets=[5x32x48,1x32x32]", "data.packing=true",
                               "data.pack_tokens=64", "training.micro_batch_size=1"], "data.image_ratio")):
        with pytest.raises(ConfigError) as caught:
            load_config("tiny", overrides=overrides)
        assert caught.value.field_name == field, (overrides, caught.value)
    load_config("tiny", overrides=["data.image_ratio=1", "data.buckets=[1x32x32]"])  # images only
    stages = "data.stages=[{until_step: 4, buckets: [5x32x48]}, {buckets: [5x32x48, 1x32x32], image_ratio: 0.2}]"
    assert load_config("tiny", overrides=[stages]).data.stage_configs()[1][2].image_ratio == 0.2
    with pytest.raises(ConfigError, match="1-frame buckets"):
        load_config("tiny", overrides=[stages.replace("1x32x32", "9x32x48")])


def test_a_clip_index_folder_is_online_data_and_an_image_index_is_not(corpus, index, tmp_path, capsys):
    from cogvx_mega.data.online import OnlineDataset
    from cogvx_mega.tools.training_data import open_training_data

    folder = tmp_path / "clip-index"
    assert main(["data", "index", str(corpus / "all.jsonl"), "--output", str(folder), "--config", EXAMPLE]) == 0
    from_index = open_training_data(config_of(corpus, folder, "data.num_workers=0"))
    from_manifest = open_training_data(config_of(corpus, "all.jsonl", "data.num_workers=0"))
    try:
        assert [from_index.batch_of_step(s, 2, seed=1) for s in range(12)] == \
               [from_manifest.batch_of_step(s, 2, seed=1) for s in range(12)]
        assert torch.equal(from_index.step_batch(1, range(2), 2, seed=1)["latents"],
                           from_manifest.step_batch(1, range(2), 2, seed=1)["latents"])
    finally:
        from_index.close()
        from_manifest.close()
    unmixed = open_training_data(config_of(corpus, folder, "data.image_ratio=null"))
    assert isinstance(unmixed, OnlineDataset)  # a clip index as --data is online mode, as its manifest is
    unmixed.close()
    capsys.readouterr()
    code = main(["train", *online_args(corpus, index, "--run-dir", str(tmp_path / "run"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and len(err) == 1 and "data.images=PATH" in err[0], err


def test_an_index_of_200k_shards_orders_1000_steps_with_memory_by_shard(tmp_path):
    """2B images in 200k shards: opening the index and finding the shard and image of every slot of 1000 steps
    takes well under the time of a step, holding arrays over the shards and nothing per image."""
    import functools
    import hashlib
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cogvx_mega.data.cache import CachePlan
    from cogvx_mega.data.image_shards import ImageShardIndex, MixedDataset, image_plan, stream_step
    from cogvx_mega.data.online import OnlineDataset

    shards = 200_000
    rng = np.random.default_rng(0)
    sizes = np.array([(480, 720), (720, 480), (768, 768)])[rng.integers(0, 3, shards)]
    columns = {"path": [f"/data/laion/{i:06d}.tar" for i in range(shards)],
               "count": rng.integers(8_000, 12_000, shards), "width": sizes[:, 1], "height": sizes[:, 0],
               "image_sizes": np.ones(shards, np.int64), "bytes": rng.integers(1 << 28, 1 << 29, shards)}
    folder = tmp_path / "index"
    folder.mkdir()
    pq.write_table(pa.table(columns), folder / "shards.parquet")
    (folder / "index.json").write_text(json.dumps({
        "format": "cogvx-mega/image-shards-v1", "shards": shards, "images": int(columns["count"].sum()),
        "mixed_sizes": 0, "skipped": 0, "skipped_examples": [], "file": "shards.parquet",
        "bytes": (folder / "shards.parquet").stat().st_size, "fingerprint": hashlib.sha256(b"x").hexdigest()}))
    del columns, sizes

    tracemalloc.start()
    index = ImageShardIndex.open(folder)
    plan, _ = image_plan(index, ["1x480x720", "1x720x480", "1x768x768", "49x480x720"])
    videos = CachePlan(clips={"49x480x720": [{}] * 512}, unfit=[], shards=[], fingerprint="")
    streams = [OnlineDataset(stream_plan, encoder=None, scaling_factor=1.0,
                             order_step=functools.partial(stream_step, image_ratio=0.5, images=images))
               for images, stream_plan in ((True, plan), (False, videos))]
    mixed = MixedDataset(*streams, 0.5, global_batch=256)
    located = 0
    for step in range(2000):  # 1000 image steps
        bucket, clips = mixed.batch_of_step(step, 256, seed=3)
        if mixed.is_image_step(step):
            rows, numbers = plan.clips[bucket].locate(clips)
            assert (numbers < index.counts[rows]).all()
            located += len(rows)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert index.images > 1.9e9 and located == 256_000
    assert peak < 200 << 20, peak  # the Arrow table and arrays over the shards

    seen, grows = set(), []

    def walk(value, where):  # every container the dataset holds: none may be as long as the images
        if id(value) in seen or isinstance(value, (str, bytes, int, float, type(None))):
            return
        seen.add(id(value))
        length = value.size if isinstance(value, np.ndarray) else len(value) if isinstance(
            value, (list, tuple, dict, set, pa.Array)) else 0
        if length > shards + 1:
            grows.append((where, length))
        items = (value.items() if isinstance(value, dict) else enumerate(value)
                 if isinstance(value, (list, tuple)) else vars(value).items()
                 if hasattr(value, "__dict__") and not isinstance(value, (type, np.ndarray))
                 else ())
        for key, item in items:
            walk(item, f"{where}.{key}")

    walk(mixed, "mixed")
    assert grows == [] and len(plan.clips["1x768x768"]) > 600e6
