"""The latent cache: `cogvx data encode --manifest M --vae VAE --text-encoder T5 --output cache.zarr`.

A zarr v3 store. Per bucket (`FRAMESxHEIGHTxWIDTH`, see `buckets.py`) four arrays, chunked one clip per
chunk: `<bucket>/mean` and `<bucket>/logvar` [N, C, T', H/8, W/8] (the VAE posterior's moments, before the
latent scale, so training draws a fresh posterior sample every time, REFERENCE §5), `<bucket>/text`
[N, L, D] (T5 embeddings) and `<bucket>/first_frame` [N, 3, H, W] uint8 (the clip's first frame, which
image-to-video training noises and encodes at every step; caches written before it existed lack it). The clip table (source path, caption, bucket, index) is in the store's
attributes, with the VAE's latent scale and what the cache was made from.

Work is split into shards of `shard_clips` consecutive clips of one bucket; shard s belongs to rank
s mod world size, so any number of ranks write disjoint chunks. A shard is committed by a marker file
written atomically after all its chunks (`commits/<bucket>/<first clip>.json`, listing the clips that
failed to decode); readers use committed shards only, and a restarted encode skips them and rewrites the
rest, so a run killed at any moment resumes with no duplicate and no hole.

With data.small_buckets=merge the plan moves the clips of a bucket holding fewer than the global batch to the
nearest bucket that fills one (`buckets.merge_small_buckets`), so they are decoded and encoded at that bucket's
size: a latent cannot be resized into another bucket's latent, so merging happens here, before encoding. The
store's `merged` attribute records the moves, `small_buckets` and `global_batch` what the plan was made for.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from cogvx_mega.checkpoint.atomic import atomic_directory, full_disk_error, write_text_atomically
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.buckets import Bucket, group_by_bucket, merge_small_buckets
from cogvx_mega.data.order import ClipRange

if TYPE_CHECKING:
    from cogvx_mega.data.encoder import ClipEncoder

logger = logging.getLogger(__name__)

CACHE_FORMAT = "cogvx-mega/latent-cache-v1"
FIRST_FRAME = "first_frame"
"""The array of each clip's first frame, uint8 [3, H, W] (image-to-video training encodes it at every step)."""
COMMITS = "commits"


@dataclass(frozen=True)
class Shard:
    bucket: str
    start: int
    stop: int

    @property
    def marker(self) -> str:
        return f"{COMMITS}/{self.bucket}/{self.start:09d}.json"


@dataclass
class CachePlan:
    clips: dict[str, list[dict]]
    """bucket name -> its manifest records, in manifest order (index = position in the bucket's arrays)."""
    unfit: list[dict]
    shards: list[Shard]
    fingerprint: str
    """What the cache is made from (manifest lines, buckets, fps, shard size, merged buckets): a restart must
    match it."""
    merged: dict[str, dict[str, int]] = field(default_factory=dict)
    """{small bucket: {bucket: clips moved there}} with data.small_buckets=merge (`buckets.merge_small_buckets`)."""


def plan_cache(records: list[dict], bucket_names: list[str], fps: float, shard_clips: int,
               merge_below: Optional[int] = None) -> CachePlan:
    """`merge_below`: the global batch, with data.small_buckets=merge: the clips of a bucket holding fewer go to
    the nearest bucket that fills one, and are encoded at its size."""
    buckets = [Bucket.parse(name) for name in bucket_names]
    grouped, unfit = group_by_bucket(records, buckets, fps)
    merged: dict[str, dict[str, int]] = {}
    if merge_below:
        grouped, merged = merge_small_buckets(grouped, fps, merge_below)
    clips = {bucket.name: grouped[bucket] for bucket in buckets}
    shards = [Shard(name, start, min(start + shard_clips, len(items)))
              for name, items in clips.items() for start in range(0, len(items), shard_clips)]
    made_from = {"records": records, "buckets": bucket_names, "fps": fps, "shard_clips": shard_clips}
    if merged:  # only then: a cache planned without merging keeps the fingerprint it always had
        made_from["merged"] = merged
    digest = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()
    return CachePlan(clips, unfit, shards, digest, merged)


def plan_from_manifest(manifest: str | Path, bucket_names: list[str], fps: float, shard_clips: int,
                       merge_below: Optional[int] = None) -> tuple[CachePlan, list[str]]:
    """The plan of a manifest's clips (or of a clip index folder built from one, `index.py`), and the 'skipped
    PATH: reason' lines of the manifest lines left out (no path, caption or size, or fitting no bucket; the
    first `index.SKIPPED_SHOWN`, then a count). `cogvx data encode` and online training plan alike, so a clip
    has the same bucket and index in both. The records are read from the index as shards need them: memory
    does not grow with the manifest. `merge_below`: see `plan_cache`."""
    from cogvx_mega.data.index import index_for, skipped_lines

    index = index_for(manifest, bucket_names, fps, merge_below, flag="--manifest")
    counts = index.clip_counts()
    clips = {name: index.records(name) for name in counts}
    shards = [Shard(name, start, min(start + shard_clips, count))
              for name, count in counts.items() for start in range(0, count, shard_clips)]
    fingerprint = hashlib.sha256(f"{index.fingerprint}/{shard_clips}".encode()).hexdigest()
    return CachePlan(clips, [], shards, fingerprint, index.merged), skipped_lines(index)


def missing_files(plan: CachePlan, stop_at_first_found: bool = False) -> list[str]:
    """The paths of the planned clips whose file does not exist (any more), in plan order; with
    `stop_at_first_found`, only those before the first file that exists (enough to tell that all are gone)."""
    missing = []
    for items in plan.clips.values():
        for start in range(0, len(items), 4096):
            for record in items[start:start + 4096]:
                if Path(record["path"]).exists():
                    if stop_at_first_found:
                        return missing
                    continue
                missing.append(record["path"])
    return missing


def check_output(path: Path, plan: CachePlan, overwrite: bool) -> bool:
    """Whether `path` holds this plan's cache already (a resume); a clear error if it holds anything else
    and `overwrite` is off. Every rank calls it, so a refusal stops all ranks alike."""
    import zarr

    if not path.exists() or overwrite:
        return False
    if not (path / "zarr.json").is_file():
        raise ConfigError("--output", str(path), "exists and is not a latent cache; pass --overwrite or another path")
    existing = zarr.open_group(str(path), mode="r").attrs.asdict()
    if existing.get("format") != CACHE_FORMAT or existing.get("fingerprint") != plan.fingerprint:
        raise ConfigError("--output", str(path), "already holds another cache (other manifest, buckets, fps or "
                                                 "shard size); pass --overwrite or another path")
    return True


def create_store(path: Path, plan: CachePlan, latent_channels: int, text_length: int, text_width: int,
                 attributes: dict) -> None:
    """The empty store (arrays, clip table); a store of the same plan (`check_output`) is left as it is. It is
    built in a hidden folder and renamed into place, so a store that exists is whole (a full disk half-way
    leaves nothing)."""
    if (path / "zarr.json").is_file():
        return
    with atomic_directory(path) as building:
        _create_arrays(building, plan, latent_channels, text_length, text_width, attributes)


def _create_arrays(path: Path, plan: CachePlan, latent_channels: int, text_length: int, text_width: int,
                   attributes: dict) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    table = []
    for name, items in plan.clips.items():
        bucket = Bucket.parse(name)
        latent = (latent_channels, 1 + (bucket.frames - 1) // 4, bucket.height // 8, bucket.width // 8)
        count = len(items)
        for array in ("mean", "logvar"):
            group.create_array(f"{name}/{array}", shape=(count, *latent), chunks=(1, *latent), dtype="float32",
                               fill_value=0.0)
        group.create_array(f"{name}/text", shape=(count, text_length, text_width), chunks=(1, text_length, text_width),
                           dtype="float32", fill_value=0.0)
        group.create_array(f"{name}/{FIRST_FRAME}", shape=(count, 3, bucket.height, bucket.width),
                           chunks=(1, 3, bucket.height, bucket.width), dtype="uint8", fill_value=0)
        table.extend({"bucket": name, "index": i, "path": r["path"], "caption": r["caption"]}
                     for i, r in enumerate(items))
    group.attrs.update({"format": CACHE_FORMAT, "fingerprint": plan.fingerprint, "clips": table,
                        "buckets": list(plan.clips), "shard_count": len(plan.shards), "merged": plan.merged,
                        **attributes})


def committed(path: Path) -> dict[str, dict]:
    """marker name -> its content, for every committed shard."""
    root = path / COMMITS
    if not root.is_dir():
        return {}
    return {f"{COMMITS}/{p.parent.name}/{p.name}": json.loads(p.read_text()) for p in root.glob("*/*.json")}


def write_shard(path: Path, plan: CachePlan, shard: Shard, encoder: "ClipEncoder",
                decoded: Optional[list] = None) -> dict:
    """Encode a shard's clips (`decoded`: their decodes started ahead), write their chunks, then commit the
    shard with its marker. A shard that fails to write (a full disk) removes the chunks it wrote and stays
    uncommitted, so the same command run again writes it; a full disk is raised as the OSError of writing the
    cache."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    records = plan.clips[shard.bucket][shard.start:shard.stop]
    encoded = encoder.encode(records, Bucket.parse(shard.bucket), decoded)
    failed = []
    try:
        for offset, (pair, reason) in enumerate(zip(encoded.moments, encoded.failures)):
            index = shard.start + offset
            if pair is None:
                failed.append({"index": index, "path": records[offset]["path"], "reason": reason})
                continue
            group[f"{shard.bucket}/mean"][index] = pair[0]
            group[f"{shard.bucket}/logvar"][index] = pair[1]
            group[f"{shard.bucket}/text"][index] = encoded.text[offset]
            group[f"{shard.bucket}/{FIRST_FRAME}"][index] = encoded.first_frames[offset]
        marker = {"clips": shard.stop - shard.start, "failed": failed}
        write_text_atomically(path / shard.marker, json.dumps(marker))
    except BaseException as error:
        full = full_disk_error(error, path)
        _remove_chunks(path, group, shard)
        if full is not None:
            raise full from error
        raise
    return marker


def _remove_chunks(path: Path, group, shard: Shard) -> None:
    """The chunk files of an uncommitted shard's clips (zarr writes each whole, through a temporary file) and
    their folders (`<array>/c/<clip>/...`, which hold only that clip's chunk)."""
    for name in ("mean", "logvar", "text", FIRST_FRAME):
        array = group[f"{shard.bucket}/{name}"]
        for index in range(shard.start, shard.stop):
            key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))  # c/<clip>/0/0/...
            clip_folder = path / shard.bucket / name / "/".join(key.split("/")[:2])
            if clip_folder.is_dir():
                shutil.rmtree(clip_folder, ignore_errors=True)
            else:
                (path / shard.bucket / name / key).unlink(missing_ok=True)


def encode_cache(path: Path, plan: CachePlan, encoder: "ClipEncoder", rank: int = 0, world_size: int = 1,
                 progress: bool = True, barrier: Callable[[], None] = lambda: None) -> dict:
    """Write this rank's uncommitted shards (rank 0 creates the store before, the caller's barrier between),
    decoding the next shard's clips in the encoder's worker threads while the VAE encodes this one; returns
    counts for this rank."""
    done = committed(path)
    mine = [s for i, s in enumerate(plan.shards) if i % world_size == rank and s.marker not in done]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s.stop - s.start for s in plan.shards), unit="clip", desc="encode", dynamic_ncols=True,
                   initial=sum(m["clips"] for m in done.values()))

    def start_decoding(shard: Shard) -> list:
        return encoder.decode_ahead(plan.clips[shard.bucket][shard.start:shard.stop], Bucket.parse(shard.bucket))

    started, clips, failed = time.perf_counter(), 0, 0
    upcoming = start_decoding(mine[0]) if mine else []
    for number, shard in enumerate(mine):
        decoded = upcoming
        upcoming = start_decoding(mine[number + 1]) if number + 1 < len(mine) else []
        marker = write_shard(path, plan, shard, encoder, decoded)
        clips += marker["clips"]
        failed += len(marker["failed"])
        for failure in marker["failed"]:
            logger.warning("skipped %s: %s", failure["path"], failure["reason"])
        if bar is not None:
            bar.update(marker["clips"] * world_size)  # the other ranks advance alike
            bar.set_postfix(clips_per_s=f"{clips * world_size / (time.perf_counter() - started):.2f}")
    if bar is not None:
        bar.close()
    barrier()
    return {"shards": len(mine), "clips": clips, "failed": failed, "seconds": time.perf_counter() - started}


def usable_clips(path: Path, markers: Optional[dict[str, dict]] = None) -> dict[str, ClipRange]:
    """bucket -> its committed, successfully encoded clips (what a reader may use), as a `ClipRange`: the
    bucket's index range less the clips that failed and any shard not committed yet (memory grows with those
    holes, not with the clips); `markers`: `committed(path)` when the caller has read them already."""
    covered: dict[str, list[tuple[int, int]]] = {}
    failed: dict[str, list[int]] = {}
    for name, marker in (committed(path) if markers is None else markers).items():
        bucket, start = name.split("/")[1], int(Path(name).stem)
        covered.setdefault(bucket, []).append((start, start + marker["clips"]))
        failed.setdefault(bucket, []).extend(f["index"] for f in marker["failed"])
    usable = {}
    for bucket, spans in sorted(covered.items()):
        spans.sort()
        holes, end = [], 0
        for start, stop in spans:
            holes.extend(range(end, start))  # a shard not committed (yet)
            end = max(end, stop)
        usable[bucket] = ClipRange(end, holes + failed[bucket])
    return usable


def read_cache_arrays(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every usable clip's arrays (bucket -> mean / logvar / text, in index order) and source paths.
    (Tests and tools; training reads through tensorstore, `cache_reader.py`.)"""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    table = group.attrs["clips"]
    out = {}
    for bucket, indices in usable_clips(path).items():
        indices = list(indices)
        out[bucket] = {array: np.stack([group[f"{bucket}/{array}"][i] for i in indices])
                       for array in ("mean", "logvar", "text")}
        chosen = set(indices)
        out[bucket]["paths"] = [row["path"] for row in table if row["bucket"] == bucket and row["index"] in chosen]
    return out
