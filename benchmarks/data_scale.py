"""The data path at the paper's scale, simulated: 35M video clips and 2B images, no media.

    python benchmarks/data_scale.py --clips 35000000 --images 2000000000 --json
    python benchmarks/data_scale.py --clips 100000 --images 1000000          # a quick look

What it measures, through the classes `cogvx train --data` uses (not copies of their logic):
- index_build_s: `cogvx_mega.data.index.build_index` over a synthetic JSONL manifest of `--clips` lines
  (captions of ~`--caption-bytes` bytes cut from a random text of real-looking words; paths, sizes, rates and
  durations varied); writing the manifest itself is not counted (it is `manifest_write_s`).
- index_bytes_per_item: bytes on disk of the index over its clips.
- image_index_bytes_per_image: an image index of `--images` images in tar shards of `--images-per-shard` (the
  format `cogvx data index-images` writes: one Parquet row per shard, synthetic rows, no tars).
- In a fresh process (so that nothing of the build is resident), one rank of a run: the manifest's plan from the
  index (`cache.plan_from_manifest`), the image index's plan (`image_shards.image_plan`), the online dataset of
  each stream (`online.OnlineDataset`, its order `order.BucketedBatches`) mixed at `--image-ratio`
  (`image_shards.MixedDataset`, as training builds it for data.images), then the order of 1,000 steps at a global
  batch of `--global-batch`: rss_gib (peak resident memory of that process, Python, torch and pyarrow included),
  step_lookup_ms (median time of one step's clips: which clips, and for an image step which shard and member),
  resume_s (opening both indexes and computing step 1,000,000's clips, from process start to the answer, imports
  excluded).
- files_per_million_clips: files of a latent cache written by the cache writer (`cache.create_store`,
  `cache.encode_cache`) for `--cache-clips` clips of a stub encoder at the default shard size, extrapolated to a
  million clips (files per shard x shards, text_row chunks, metadata).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUCKETS = ["49x480x720", "49x720x480", "49x768x1360", "81x768x1360", "1x480x720", "1x720x480", "1x768x768"]
FPS = 8.0
SEED = 1234


def write_manifest(path: Path, clips: int, caption_bytes: int, seed: int = 0) -> float:
    """A synthetic manifest of `clips` lines; returns the seconds it took."""
    started = time.perf_counter()
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(20_000)]
    text = " ".join(rng.choice(words) for _ in range(400_000))
    sizes = [(720, 1280), (1280, 720), (1080, 1920), (768, 1360), (480, 640), (1080, 1080)]
    with open(path, "w") as file:
        lines = []
        for i in range(clips):
            at = rng.randrange(0, len(text) - caption_bytes)
            height, width = sizes[i % len(sizes)] if i % 7 else sizes[rng.randrange(len(sizes))]
            image = False  # images come from the tar-shard index (`write_image_index`)
            lines.append('{"path": "/corpus/%s/%09d.%s", "caption": "%s", "kind": "%s", "container": "%s", '
                         '"codec": "%s", "fps": %s, "frames": %d, "width": %d, "height": %d}\n'
                         % ("images" if image else "clips", i, "jpg" if image else "mp4",
                            text[at:at + caption_bytes], "image" if image else "video",
                            "jpeg" if image else "mp4", "jpeg" if image else "h264",
                            "null" if image else "30.0", 1 if image else rng.randint(100, 400), width, height))
            if len(lines) == 100_000:
                file.writelines(lines)
                lines = []
        file.writelines(lines)
    return time.perf_counter() - started


def count_cache_files(clips: int, work: Path) -> dict:
    """Files of a latent cache of `clips` clips (one bucket, tiny arrays, a stub encoder, every caption distinct so
    every shard writes text) at the encoder's default shard size, written by `cache.encode_cache` (claims and
    markers included); per million clips: the files of a shard times the shards of a million clips, plus the
    text_row chunks of a million clips and the store's metadata."""
    import math

    import numpy as np

    from cogvx_mega.data import cache
    from cogvx_mega.data.encoder import EncodedClips
    from cogvx_mega.tools.data_encode import DEFAULT_SHARD_CLIPS

    class StubEncoder:
        """What `cache.write_shard` asks of a `ClipEncoder`, without a VAE or T5 (values that are not the fill
        value, so every chunk is stored)."""

        def encode(self, records, bucket, decoded=None):
            latent = (4, 1 + (bucket.frames - 1) // 4, bucket.height // 8, bucket.width // 8)
            moments = [(np.ones(latent, np.float32), np.ones(latent, np.float32)) for _ in records]
            return EncodedClips(moments, np.ones((len(records), 4, 8), np.float32), [None] * len(records),
                                [np.ones((3, bucket.height, bucket.width), np.uint8) for _ in records])

    def count(store: Path) -> int:
        return sum(len(names) for _, _, names in os.walk(store))

    records = [{"path": f"/x/{i}.mp4", "caption": f"clip {i}", "kind": "video", "fps": 8.0, "frames": 9,
                "width": 16, "height": 16} for i in range(clips)]
    plan = cache.plan_cache(records, ["9x16x16"], FPS, DEFAULT_SHARD_CLIPS)
    store = work / "cache.zarr"
    cache.create_store(store, plan, 4, 4, 8, {"scaling_factor": 1.0})
    created = count(store)
    cache.encode_cache(store, plan, StubEncoder(), progress=False)
    files = count(store)
    per_shard = (files - created) / len(plan.shards)
    row_chunks = math.ceil(clips / cache.TEXT_ROW_CHUNK)
    per_million = (per_shard * math.ceil(1_000_000 / DEFAULT_SHARD_CLIPS) + math.ceil(1_000_000 / cache.TEXT_ROW_CHUNK)
                   + created - row_chunks)
    return {"cache_clips": clips, "shard_clips": DEFAULT_SHARD_CLIPS, "cache_files": files,
            "cache_files_per_shard": per_shard, "cache_metadata_files": created - row_chunks,
            "files_per_million_clips": round(per_million)}


def write_image_index(folder: Path, images: int, per_shard: int, seed: int = 0) -> None:
    """The index `cogvx data index-images` writes, for `images` images in shards of about `per_shard` (synthetic
    rows: the sizes img2dataset resizes to, no tars)."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cogvx_mega.data.image_shards import IMAGE_INDEX_FORMAT

    shards = max(1, images // per_shard)
    rng = np.random.default_rng(seed)
    counts = np.full(shards, images // shards, np.int64)
    counts[: images - int(counts.sum())] += 1
    sizes = np.array([(480, 720), (720, 480), (768, 768)])[rng.integers(0, 3, shards)]
    table = pa.table({"path": [f"/corpus/images/{i:07d}.tar" for i in range(shards)], "count": counts,
                      "width": sizes[:, 1], "height": sizes[:, 0], "image_sizes": np.ones(shards, np.int64),
                      "bytes": counts * 60_000})
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "shards.parquet", compression="zstd")
    (folder / "index.json").write_text(json.dumps({
        "format": IMAGE_INDEX_FORMAT, "shards": shards, "images": int(counts.sum()), "mixed_sizes": 0, "skipped": 0,
        "skipped_examples": [], "file": "shards.parquet", "bytes": (folder / "shards.parquet").stat().st_size,
        "fingerprint": hashlib.sha256(f"{images}/{per_shard}/{seed}".encode()).hexdigest()}))


def peak_resident_bytes() -> int:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: Linux carries that across exec, so
    a process started by a parent holding gigabytes would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_order(index: str, images: str, image_ratio: float, global_batch: int, steps: int) -> dict:
    """One rank: the plans of both indexes, the streams' online datasets mixed as training mixes them, the order
    of `steps` steps, a resume at step 1,000,000."""
    import functools

    import numpy as np

    from cogvx_mega.data.cache import plan_from_manifest
    from cogvx_mega.data.image_shards import ImageShardIndex, MixedDataset, image_plan, split_plan, stream_step
    from cogvx_mega.data.online import OnlineDataset

    started = time.perf_counter()
    plan, _ = plan_from_manifest(index, BUCKETS, FPS, shard_clips=0)  # as online mode plans it
    image_index = ImageShardIndex.open(images)
    pictures, _ = image_plan(image_index, BUCKETS)
    streams = {kind: OnlineDataset(stream, encoder=None, scaling_factor=1.0,
                                   order_step=functools.partial(stream_step, image_ratio=image_ratio,
                                                                images=kind == "images"))
               for kind, stream in (("images", pictures), ("videos", split_plan(plan, images=False)))}
    mixed = MixedDataset(streams["images"], streams["videos"], image_ratio, global_batch)

    def clips_of(step: int) -> int:
        bucket, clips = mixed.batch_of_step(step, global_batch, SEED)
        if mixed.is_image_step(step):  # which shard and which member of it
            rows, numbers = pictures.clips[bucket].locate(clips)
            assert (numbers < image_index.counts[rows]).all()
        return len(clips)

    assert clips_of(1_000_000) == global_batch
    resume_s = time.perf_counter() - started
    times = []
    for step in range(steps):
        before = time.perf_counter()
        clips_of(step)
        times.append(time.perf_counter() - before)
    bucket, clips = mixed.batch_of_step(0 if not mixed.is_image_step(0) else 1, global_batch, SEED)
    record = plan.clips[bucket][clips[0]]  # a video clip's manifest line, read from the index
    return {"resume_s": round(resume_s, 3), "step_lookup_ms": round(float(np.median(times)) * 1e3, 3),
            "steps": steps, "global_batch": global_batch, "image_ratio": image_ratio,
            "image_steps": sum(mixed.is_image_step(s) for s in range(steps)),
            "rss_gib": round(peak_resident_bytes() / 2**30, 3),
            "first_video_clip": record["path"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--images-per-shard", type=int, default=10_000)
    parser.add_argument("--image-ratio", type=float, default=0.25, help="share of the steps that are image steps")
    parser.add_argument("--caption-bytes", type=int, default=300)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--cache-clips", type=int, default=8192)
    parser.add_argument("--work", default=None, help="folder for the manifest and index (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--measure-order", nargs=2, default=None, help=argparse.SUPPRESS)  # the fresh process's part
    args = parser.parse_args()
    if args.measure_order:
        print(json.dumps(measure_order(*args.measure_order, args.image_ratio, args.global_batch, args.steps)))
        return

    from cogvx_mega.data.index import build_index, index_bytes

    total = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        result = {"clips": args.clips, "images": args.images}
        result["manifest_write_s"] = round(write_manifest(work / "manifest.jsonl", args.clips, args.caption_bytes), 1)
        result["manifest_bytes"] = (work / "manifest.jsonl").stat().st_size
        started = time.perf_counter()
        index = build_index(work / "manifest.jsonl", work / "index", BUCKETS, FPS)
        result["index_build_s"] = round(time.perf_counter() - started, 1)
        result["index_bytes_per_item"] = round(index_bytes(work / "index") / len(index), 1)
        result["indexed_clips"] = len(index)
        (work / "manifest.jsonl").unlink()
        started = time.perf_counter()
        write_image_index(work / "images", args.images, args.images_per_shard)
        result["image_index_write_s"] = round(time.perf_counter() - started, 1)
        result["image_index_bytes_per_image"] = round(index_bytes(work / "images") / args.images, 6)
        order = subprocess.run([sys.executable, __file__, "--measure-order", str(work / "index"),
                                str(work / "images"), "--image-ratio", str(args.image_ratio),
                                "--global-batch", str(args.global_batch), "--steps", str(args.steps)],
                               check=True, capture_output=True, text=True)
        result.update(json.loads(order.stdout.strip().splitlines()[-1]))
        if args.cache_clips:
            result.update(count_cache_files(args.cache_clips, work))
    result["total_s"] = round(time.perf_counter() - total, 1)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:24s} {value}")


if __name__ == "__main__":
    main()
