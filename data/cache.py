"""The latent cache: `cogvx data encode --manifest M --vae VAE --text-encoder T5 --output cache.zarr`.

A zarr v3 store (format `CACHE_FORMAT`, "latent-cache-v2"), laid out for hundreds of TB:

    zarr.json                      small attributes only: format, fingerprint, buckets and their clip counts, shard
                                   size and count, merged buckets, VAE / text encoder, latent scale, fps, ...
    <bucket>/mean, <bucket>/logvar float16 [N, C, T', H/8, W/8]: the VAE posterior's moments, before the latent
                                   scale, so training draws a fresh posterior sample every time (REFERENCE §5)
    <bucket>/first_frame           uint8 [N, 3, H, W]: each clip's first frame (image-to-video training encodes it)
    <bucket>/text_row              int32 [N]: the row of `text` holding the clip's caption embedding
    text                           float16 [rows, L, D]: T5 embeddings, one row per distinct caption
    clips/<bucket>.parquet         the clip table (source path and caption of clip i of the bucket at row i)
    commits/<bucket>/<start>.json  a shard's commit marker (the clips that failed to encode)
    claims/<bucket>/<start>.json   who writes (or wrote) a shard: host, pid, job, time

Every array but text_row uses the zarr sharding codec: an inner chunk is one clip (what a reader reads), and one
shard file holds the `shard_clips` clips of one encode shard, so a million clips make ~3,000 files at the
default 2,048 clips per shard (`tools/data_encode.DEFAULT_SHARD_CLIPS`) instead of 4 million. The moments and the
text are stored as float16 (zarr-python 3 has no bfloat16): a value beyond float16's range (±65504), or NaN,
refuses its clip with one line (`float16_problem`), never an infinity; `stored` is the round trip a reader gets,
which online mode applies too, so both train on the same numbers.

Captions are deduplicated when the store is created: every clip's caption is hashed (BLAKE2b, 8 bytes) in plan
order, and encode shard g (its position in the plan) owns text rows [g*K, g*K + u_g) for the u_g captions first
seen in it (`assign_text_rows`); each clip's text_row points at the row of its caption. A shard writes only its own
rows, from the embeddings the encoder gives its clips, so text is written once per distinct caption and shards stay
independent. A caption whose first clip fails to decode still gets its row: the text does not depend on the video.

Work is split into encode shards of K consecutive clips of one bucket (starting at multiples of K, so each writes
exactly its own shard files). A shard is written chunk by chunk into hidden temporary files renamed into place
whole (`_ShardFile`, byte for byte what zarr-python writes for the same block: memory holds a window of clips, not
the shard), then committed by its marker; readers use committed shards only, and a restarted encode skips them
and rewrites the rest, so a run killed at any moment resumes with no duplicate and no hole.

Many writers: independent jobs (`--jobs N --job I`, or a SLURM job array) take shards i mod N == I, each perhaps a
torchrun of W ranks (rank r takes every W-th of its job's shards). Before writing a shard a writer claims it with a
file created exclusively (`claim_shard`), kept alive by a heartbeat; a second writer finding a live claim skips the
shard with one line; a claim whose process has ended (same machine) or that has shown no sign of life for
`claim_timeout` seconds is taken over with one line (a new claim generation, created exclusively too, so two
takers cannot both win). The marker is the truth: committing writes it and removes nothing.

With data.small_buckets=merge the plan moves the clips of a bucket holding fewer than the global batch to the
nearest bucket that fills one (`buckets.merge_small_buckets`), so they are decoded and encoded at that bucket's
size: a latent cannot be resized into another bucket's latent, so merging happens here, before encoding. The
store's `merged` attribute records the moves, `small_buckets` and `global_batch` what the plan was made for.

A "latent-cache-v1" store (float32, one file per clip and array, the clip table in zarr.json) is still read for
training and `cogvx data info`; `cogvx data encode` does not extend one (re-encode it).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from cogvx_mega.checkpoint.atomic import apply_umask, hidden_sibling, removed_on_error, write_text_atomically
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.buckets import Bucket, group_by_bucket, merge_small_buckets
from cogvx_mega.data.order import ClipRange
from cogvx_mega.files import full_disk_error

if TYPE_CHECKING:
    from cogvx_mega.data.encoder import ClipEncoder

logger = logging.getLogger(__name__)

CACHE_FORMAT = "cogvx-mega/latent-cache-v2"
CACHE_FORMAT_V1 = "cogvx-mega/latent-cache-v1"
"""The layout before v2 (float32, one chunk file per clip and array, per-bucket text, the clip table in the root
attributes): read, never written."""
FIRST_FRAME = "first_frame"
"""The array of each clip's first frame, uint8 [3, H, W] (image-to-video training encodes it at every step)."""
TEXT = "text"
TEXT_ROW = "text_row"
CLIPS = "clips"
COMMITS = "commits"
CLAIMS = "claims"
STORED_DTYPE = "float16"
FLOAT16_MAX = float(np.finfo(np.float16).max)
TEXT_ROW_CHUNK = 65536
"""Clips per chunk file of a bucket's text_row (256 KiB)."""
DECODE_WINDOW = 16
"""Clips decoded ahead and encoded at a time while a shard is written: what the writer holds in memory."""
CLAIM_TIMEOUT_S = 1800.0
"""A claim whose heartbeat stopped this long ago belongs to a writer that is gone (`--claim-timeout`)."""
ZSTD_LEVEL = 0
"""zstd's default level (3), as zarr-python's default compressor has it."""
TABLE_ROWS = 4096
"""Clips read (and hashed) at a time when the store is created; the clip table's Parquet row groups."""


@dataclass(frozen=True)
class Shard:
    bucket: str
    start: int
    stop: int
    number: int = 0
    """Its position in the plan's shards: the text rows [number*K, number*K + K) are its to write."""

    @property
    def marker(self) -> str:
        return f"{COMMITS}/{self.bucket}/{self.start:09d}.json"

    @property
    def name(self) -> str:
        return f"{self.bucket}/{self.start:09d}"


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
    shard_clips: int = 0
    """K: clips per encode shard and per shard file (0: a plan with no shards, e.g. online mode's)."""
    filtered: Optional[dict] = None
    """With data.filters: {"summary": the lines of `index.filter_summary`, "kept": clips kept, "dropped": lines
    each filter dropped}."""


def _shards(counts: dict[str, int], shard_clips: int) -> list[Shard]:
    """The encode shards of a plan; none for `shard_clips` 0 (online mode plans no shards: at 35M clips a Shard
    object per few clips would be gigabytes)."""
    if not shard_clips:
        return []
    starts = [(name, start, min(start + shard_clips, count)) for name, count in counts.items()
              for start in range(0, count, shard_clips)]
    return [Shard(name, start, stop, number) for number, (name, start, stop) in enumerate(starts)]


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
    shards = _shards({name: len(items) for name, items in clips.items()}, shard_clips)
    made_from = {"records": records, "buckets": bucket_names, "fps": fps, "shard_clips": shard_clips}
    if merged:  # only then: a cache planned without merging keeps the fingerprint it always had
        made_from["merged"] = merged
    digest = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()
    return CachePlan(clips, unfit, shards, digest, merged, shard_clips)


def plan_from_manifest(manifest: str | Path, bucket_names: list[str], fps: float, shard_clips: int,
                       merge_below: Optional[int] = None, filters: Optional[list] = None,
                       captions: Optional[list] = None) -> tuple[CachePlan, list[str]]:
    """The plan of a manifest's clips (or of a clip index folder built from one, `index.py`), and the 'skipped
    PATH: reason' lines of the manifest lines left out (no path, caption or size, or fitting no bucket; the
    first `index.SKIPPED_SHOWN`, then a count). `cogvx data encode` and online training plan alike, so a clip
    has the same bucket and index in both. The records are read from the index as shards need them: memory
    does not grow with the manifest. `merge_below`: see `plan_cache`; `filters`, `captions`: data.filters and
    data.captions (`index.index_for`)."""
    from cogvx_mega.data.index import filter_summary, index_for, skipped_lines

    index = index_for(manifest, bucket_names, fps, merge_below, flag="--manifest", filters=filters, captions=captions)
    counts = index.clip_counts()
    clips = {name: index.records(name) for name in counts}
    fingerprint = hashlib.sha256(f"{index.fingerprint}/{shard_clips}".encode()).hexdigest()
    filtered = None
    if index.meta.get("filters"):
        filtered = {"summary": filter_summary(index), "kept": len(index), "dropped": index.meta["filter_dropped"]}
    return (CachePlan(clips, [], _shards(counts, shard_clips), fingerprint, index.merged, shard_clips, filtered),
            skipped_lines(index))


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


# --- 16-bit storage ---------------------------------------------------------------------------------------------

def stored(values) -> np.ndarray:
    """`values` as the cache gives them back: rounded to float16, widened to float32. Online mode rounds its
    moments and text alike, so a run trains on the same numbers from the cache and online."""
    return np.asarray(values, dtype=np.float32).astype(np.float16).astype(np.float32)


def float16_problem(values) -> Optional[str]:
    """Why float16 cannot hold `values` (NaN or infinity, or a magnitude beyond 65504), or None."""
    values = np.asarray(values)
    if values.size == 0:
        return None
    peak = float(np.max(np.abs(values)))
    if not np.isfinite(peak):
        return "holds NaN or infinity"
    if peak > FLOAT16_MAX:
        return f"reaches {peak:.4g}, beyond float16's range (±65504) the latent cache stores"
    return None


def moments_problem(pair) -> Optional[str]:
    """Why a clip's (mean, logvar) cannot be stored, or None: the reason its clip is skipped."""
    for name, values in zip(("mean", "log-variance"), pair):
        problem = float16_problem(values)
        if problem:
            return f"its VAE posterior {name} {problem}; not stored"
    return None


# --- the store ---------------------------------------------------------------------------------------------------

def cache_attributes(path: Path) -> dict:
    import zarr

    return zarr.open_group(str(path), mode="r").attrs.asdict()


def check_output(path: Path, plan: CachePlan, overwrite: bool) -> bool:
    """Whether `path` holds this plan's cache already (a resume); a clear error if it holds anything else
    and `overwrite` is off. Every rank calls it, so a refusal stops all ranks alike."""
    if not path.exists() or overwrite:
        return False
    if not (path / "zarr.json").is_file():
        if path.is_dir() and not any(path.iterdir()):
            return False  # an empty folder: the store goes there
        raise ConfigError("--output", str(path), "exists and is not a latent cache; pass --overwrite or another path")
    _check_same_cache(path, plan)
    return True


def _check_same_cache(path: Path, plan: CachePlan) -> None:
    existing = cache_attributes(path)
    if existing.get("format") == CACHE_FORMAT_V1:
        raise ConfigError("--output", str(path), f"holds a {CACHE_FORMAT_V1} cache, which training still reads but "
                                                 f"this version does not extend; pass --overwrite to encode it again "
                                                 f"as {CACHE_FORMAT}, or another path")
    if existing.get("format") != CACHE_FORMAT or existing.get("fingerprint") != plan.fingerprint:
        raise ConfigError("--output", str(path), "already holds another cache (other manifest, buckets, fps or "
                                                 "shard size); pass --overwrite or another path")


def create_store(path: Path, plan: CachePlan, latent_channels: int, text_length: int, text_width: int,
                 attributes: dict) -> bool:
    """The empty store (arrays, text rows, clip table); a store of the same plan is left as it is. It is built in
    a hidden folder and renamed into place, so a store that exists is whole (a full disk half-way leaves nothing).
    Creators may race (the first rank of each of several jobs): the rename of the first wins, the others find its
    store, drop theirs and check it is of this plan. Returns whether this call created it."""
    if (path / "zarr.json").is_file():
        _check_same_cache(path, plan)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_sibling(path, ".tmp-")
    tmp.mkdir()
    with removed_on_error(tmp, path):
        _create_arrays(tmp, plan, latent_channels, text_length, text_width, attributes)
        apply_umask(tmp)
        try:
            os.rename(tmp, path)  # replaces an empty folder; fails where another creator's store is in place
            return True
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (path / "zarr.json").is_file():
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("another encode created %s at the same time; using its store", path)
    _check_same_cache(path, plan)
    return False


def _create_arrays(path: Path, plan: CachePlan, latent_channels: int, text_length: int, text_width: int,
                   attributes: dict) -> None:
    import zarr

    per_shard = plan.shard_clips or max([s.stop - s.start for s in plan.shards] or [1])
    zstd = zarr.codecs.ZstdCodec(level=ZSTD_LEVEL)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name, items in plan.clips.items():
        bucket = Bucket.parse(name)
        latent = (latent_channels, 1 + (bucket.frames - 1) // 4, bucket.height // 8, bucket.width // 8)
        count = len(items)
        for array in ("mean", "logvar"):
            group.create_array(f"{name}/{array}", shape=(count, *latent), chunks=(1, *latent),
                               shards=(per_shard, *latent), dtype=STORED_DTYPE, fill_value=0.0, compressors=zstd)
        frame = (3, bucket.height, bucket.width)
        group.create_array(f"{name}/{FIRST_FRAME}", shape=(count, *frame), chunks=(1, *frame),
                           shards=(per_shard, *frame), dtype="uint8", fill_value=0, compressors=zstd)
        group.create_array(f"{name}/{TEXT_ROW}", shape=(count,), chunks=(TEXT_ROW_CHUNK,), dtype="int32",
                           fill_value=-1, compressors=zstd)
    text_rows = len(plan.shards) * per_shard
    if text_rows >= 2 ** 31:
        raise ConfigError("--manifest", None, f"{text_rows} text rows do not fit a 32-bit index; encode the corpus "
                                              f"as several caches")
    group.create_array(TEXT, shape=(text_rows, text_length, text_width), chunks=(1, text_length, text_width),
                       shards=(per_shard, text_length, text_width), dtype=STORED_DTYPE, fill_value=0.0,
                       compressors=zstd)
    distinct = _write_text_rows_and_clip_table(path, group, plan, per_shard)
    group.attrs.update({"format": CACHE_FORMAT, "fingerprint": plan.fingerprint, "buckets": list(plan.clips),
                        "clips": {name: len(items) for name, items in plan.clips.items()},
                        "shard_clips": per_shard, "shard_count": len(plan.shards), "text_rows": distinct,
                        "stored_dtype": STORED_DTYPE, "merged": plan.merged, **attributes})


def caption_hash(caption: str) -> int:
    """A caption's 64-bit key (BLAKE2b, 8 bytes): clips with equal keys share one text row."""
    return int.from_bytes(hashlib.blake2b(caption.encode(), digest_size=8).digest(), "little")


def assign_text_rows(hashes: np.ndarray, shard_of: np.ndarray, shard_clips: int) -> np.ndarray:
    """The text row of every clip (plan order): the u_g captions first seen in shard g get rows g*K .. g*K+u_g-1
    in the order they are first seen; every clip points at its caption's row. ~40 bytes per clip, no Python
    object per clip."""
    if hashes.size == 0:
        return np.zeros(0, np.int64)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    is_first = np.zeros(hashes.size, bool)
    is_first[first] = True
    before = np.cumsum(is_first) - is_first  # first occurrences before each position
    starts = np.flatnonzero(np.r_[True, shard_of[1:] != shard_of[:-1]])
    before -= np.repeat(before[starts], np.diff(np.r_[starts, hashes.size]))  # ... within its shard
    rows = shard_of.astype(np.int64) * shard_clips + before
    return rows[first][inverse.reshape(-1)]


def _write_text_rows_and_clip_table(path: Path, group, plan: CachePlan, per_shard: int) -> int:
    """One pass over the plan's records (read `TABLE_ROWS` at a time): the clip table and the caption hashes;
    then every clip's text row. Returns the number of distinct captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts = {name: len(items) for name, items in plan.clips.items()}
    hashes = np.zeros(sum(counts.values()), np.uint64)
    shard_of = np.zeros(hashes.size, np.int64)
    (path / CLIPS).mkdir()
    schema = pa.schema([("path", pa.string()), ("caption", pa.string())])
    position, first_shard = 0, 0
    for name, items in plan.clips.items():
        with pq.ParquetWriter(path / CLIPS / f"{name}.parquet", schema, compression="zstd") as table:
            for start in range(0, counts[name], TABLE_ROWS):
                block = items[start:start + TABLE_ROWS]
                captions = [record["caption"] for record in block]
                hashes[position:position + len(block)] = np.fromiter(map(caption_hash, captions), np.uint64,
                                                                     len(captions))
                table.write_table(pa.table({"path": [record["path"] for record in block], "caption": captions},
                                           schema=schema), row_group_size=TABLE_ROWS)
                position += len(block)
        shard_of[position - counts[name]:position] = first_shard + np.arange(counts[name]) // per_shard
        first_shard += -(-counts[name] // per_shard)
    numbers = [s.number for s in plan.shards]
    if first_shard != len(plan.shards) or numbers != list(range(len(numbers))) or any(
            s.start % per_shard for s in plan.shards):
        raise ValueError("the plan's shards must be the buckets' clips cut at multiples of shard_clips, in order")
    rows = assign_text_rows(hashes, shard_of, per_shard)
    position = 0
    for name, count in counts.items():
        if count:
            group[f"{name}/{TEXT_ROW}"][:] = rows[position:position + count].astype(np.int32)
        position += count
    return int(np.unique(rows).size)


def clip_paths(path: Path, bucket: str, indices=None) -> list[str]:
    """The source paths of a bucket's clips (all, or at `indices`), from the clip table."""
    attrs = cache_attributes(path)
    if attrs.get("format") == CACHE_FORMAT_V1:
        rows = {row["index"]: row["path"] for row in attrs["clips"] if row["bucket"] == bucket}
        return [rows[i] for i in (sorted(rows) if indices is None else indices)]
    import pyarrow.parquet as pq

    column = pq.read_table(path / CLIPS / f"{bucket}.parquet", columns=["path"]).column("path")
    if indices is not None:
        column = column.take(np.asarray(list(indices), dtype=np.int64))
    return column.to_pylist()


# --- claims: one writer per shard ---------------------------------------------------------------------------------

def _machine() -> str:
    """What tells two processes apart: host name, boot and pid namespace (a pid means one process only there)."""
    parts = [socket.gethostname()]
    for where, read in (("/proc/sys/kernel/random/boot_id", lambda p: Path(p).read_text().strip()),
                        ("/proc/self/ns/pid", os.readlink)):
        try:
            parts.append(read(where))
        except OSError:
            parts.append("?")
    return "|".join(parts)


def _process_ended(pid: int) -> bool:
    if pid <= 0:
        return False  # not a pid: cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie (killed, not yet reaped) has ended too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _claim_file(path: Path, shard: Shard, generation: int) -> Path:
    suffix = "" if generation == 0 else f".{generation}"
    return path / CLAIMS / shard.bucket / f"{shard.start:09d}{suffix}.json"


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def _holder(content: dict) -> str:
    job = f", job {content['job']} of {content['jobs']}" if content.get("jobs", 1) > 1 else ""
    return f"{content.get('host', '?')} pid {content.get('pid', '?')}{job}"


class Claim:
    """This process's claim on a shard: a heartbeat thread refreshes the claim file's time while it is held;
    `owned()` says whether no writer has taken it over since."""

    def __init__(self, path: Path, shard: Shard, generation: int, heartbeat_s: float):
        self.path, self.shard, self.generation = path, shard, generation
        self.file = _claim_file(path, shard, generation)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name="cogvx-claim-heartbeat")
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                os.utime(self.file)
            except OSError:
                pass

    def owned(self) -> bool:
        return not _claim_file(self.path, self.shard, self.generation + 1).exists()

    def stop(self) -> None:
        """The shard is committed (the claim stays: it records who wrote the shard) or abandoned."""
        self._stop.set()

    def release(self) -> None:
        """Give the shard up uncommitted: the claim is marked released, so the next writer takes it at once."""
        self.stop()
        if not self.owned():
            return
        try:
            content = json.loads(self.file.read_text())
            write_text_atomically(self.file, json.dumps({**content, "released": True}))
        except (OSError, ValueError):  # a full disk: no claim beats a claim that looks alive
            self.file.unlink(missing_ok=True)


def _create_exclusively(file: Path, content: dict) -> bool:
    """Write `file` with `content` only if it does not exist (a hard link of a finished temporary file: atomic,
    and safe on NFS), so a reader never sees it half written."""
    tmp = hidden_sibling(file, ".tmp-")
    tmp.write_text(json.dumps(content))
    try:
        os.link(tmp, file)
        return True
    except FileExistsError:
        return False
    except OSError as error:  # a filesystem without hard links: an exclusive create, then the content
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        try:
            descriptor = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as out:
            out.write(json.dumps(content))
        return True
    finally:
        tmp.unlink(missing_ok=True)


def claim_shard(path: Path, shard: Shard, owner: dict, timeout_s: float = CLAIM_TIMEOUT_S) -> Optional[Claim]:
    """Claim `shard` for this process, or None (with one line) when a live writer holds it. A claim whose process
    has ended (on this machine) or whose heartbeat stopped `timeout_s` ago is taken over, with one line."""
    (path / CLAIMS / shard.bucket).mkdir(parents=True, exist_ok=True)
    content = {**owner, "machine": _machine(), "pid": os.getpid(), "shard": shard.name,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    heartbeat_s = max(0.05, min(60.0, timeout_s / 4))
    generation, replacing, unreadable = 0, None, 0
    while True:
        file = _claim_file(path, shard, generation)
        if _create_exclusively(file, content):
            if replacing:
                logger.warning("shard %s (%d clips) was claimed by %s, %s; taking it over", shard.name,
                               shard.stop - shard.start, *replacing)
            return Claim(path, shard, generation, heartbeat_s)
        if _claim_file(path, shard, generation + 1).exists():
            generation += 1  # taken over before: the newest claim decides
            continue
        try:
            held, age = json.loads(file.read_text()), time.time() - file.stat().st_mtime
        except (OSError, ValueError) as error:
            unreadable += 1
            if unreadable < 5:
                continue  # removed (a full disk's release) or replaced while being read: look again
            logger.warning("shard %s: its claim %s cannot be read (%s); skipping it", shard.name, file, error)
            return None
        if held.get("released"):
            replacing, generation = None, generation + 1  # given up by its writer: free
            continue
        if held.get("machine") == content["machine"] and held.get("pid") == os.getpid():
            return Claim(path, shard, generation, heartbeat_s)
        if held.get("machine") == content["machine"] and _process_ended(int(held.get("pid", -1))):
            why = "whose process has ended"
        elif age > timeout_s:
            why = f"whose heartbeat stopped {_age(age)} ago (--claim-timeout {timeout_s:g} s)"
        else:
            logger.warning("shard %s (%d clips) is being written by %s (heartbeat %s ago); skipping it",
                           shard.name, shard.stop - shard.start, _holder(held), _age(age))
            return None
        replacing = (_holder(held), why)
        generation += 1


# --- writing a shard ---------------------------------------------------------------------------------------------

class _ShardFile:
    """One shard file of a sharded zarr v3 array, written clip by clip: each inner chunk (one clip) as `bytes`
    (little-endian) then zstd, appended to a hidden temporary file; at the end the shard index ((offset, length)
    per inner chunk, uint64 little-endian, 2^64-1 for an empty chunk) and its crc32c; then renamed into place
    whole. Byte for byte what zarr-python writes for the same block (an all-fill chunk is left out, and a shard of
    only fill values has no file), with memory of one chunk instead of the shard."""

    EMPTY = np.uint64(2 ** 64 - 1)

    def __init__(self, array: Path, number: int, ndim: int, per_shard: int, dtype: str):
        from numcodecs import Zstd

        self.final = array / "c" / str(number)
        for _ in range(ndim - 1):
            self.final = self.final / "0"
        self.tmp, self.file = hidden_sibling(self.final, ".tmp-"), None  # opened at the first chunk
        self.index = np.full((per_shard, 2), self.EMPTY, dtype="<u8")
        self.offset, self.dtype, self.zstd = 0, np.dtype(dtype).newbyteorder("<"), Zstd(level=ZSTD_LEVEL)

    def add(self, position: int, chunk: Optional[np.ndarray]) -> None:
        if chunk is None or not np.any(chunk):
            return
        data = self.zstd.encode(np.ascontiguousarray(chunk, dtype=self.dtype).tobytes())
        if self.file is None:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.tmp, "wb")
        self.file.write(data)
        self.index[position] = (self.offset, len(data))
        self.offset += len(data)

    def finish(self) -> None:
        import google_crc32c

        if self.offset == 0:
            self.abort()
            self.final.unlink(missing_ok=True)
            return
        index = self.index.tobytes()
        try:
            self.file.write(index + np.array([google_crc32c.value(index)], dtype="<u4").tobytes())
            self.file.close()
            os.replace(self.tmp, self.final)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self.file is not None:
            try:
                self.file.close()  # flushes: on a full disk it fails too
            except OSError:
                pass
            self.tmp.unlink(missing_ok=True)


def _shard_file(path: Path, array: str, number: int) -> "_ShardFile":
    """A writer of shard file `number` of `array`, after checking that the array is laid out as `_ShardFile`
    writes (a store made by another version is refused rather than written wrong)."""
    meta = json.loads((path / array / "zarr.json").read_text())
    codecs = meta["codecs"]
    ok = len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed"
    if ok:
        conf = codecs[0]["configuration"]
        inner = conf["codecs"]
        ok = (conf["chunk_shape"] == [1, *meta["shape"][1:]] and [c["name"] for c in inner] == ["bytes", "zstd"]
              and inner[0].get("configuration", {}).get("endian", "little") == "little"
              and inner[1].get("configuration") == {"level": ZSTD_LEVEL, "checksum": False}
              and conf["index_codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}},
                                           {"name": "crc32c"}]
              and conf.get("index_location", "end") == "end")
    if not ok:
        raise ConfigError("--output", str(path), f"{array} is not laid out as this version writes; pass --overwrite "
                                                 f"or another path")
    per_shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    return _ShardFile(path / array, number, len(meta["shape"]), per_shard, meta["data_type"])


def _decoding_windows(records, bucket: Bucket, encoder, decoded: Optional[list], ahead: Optional[Callable]):
    """(first offset, records, their decode futures) of each window of `DECODE_WINDOW` clips, the next window's
    decodes started before this one is encoded (and `ahead` called at the last one, to start the next shard's)."""
    start_decoding = getattr(encoder, "decode_ahead", None)  # (stand-in encoders decode in `encode`)
    futures = list(decoded or []) if start_decoding else []

    def start_until(stop: int) -> None:
        if start_decoding and len(futures) < stop:
            futures.extend(start_decoding(records[len(futures):stop], bucket))

    for lo in range(0, len(records), DECODE_WINDOW):
        hi = min(len(records), lo + DECODE_WINDOW)
        start_until(hi)
        if hi < len(records):
            start_until(min(len(records), hi + DECODE_WINDOW))
        elif ahead is not None:
            ahead()
        window = futures[lo:hi] if start_decoding else None
        futures[lo:hi] = [None] * len(futures[lo:hi])  # the decoded frames go once encoded
        yield lo, records[lo:hi], window


def write_shard(path: Path, plan: CachePlan, shard: Shard, encoder: "ClipEncoder", decoded: Optional[list] = None,
                claim: Optional[Claim] = None, ahead: Optional[Callable[[], None]] = None) -> Optional[dict]:
    """Encode a shard's clips a window at a time (`decoded`: the decodes of its first clips, started ahead;
    `ahead`: called when its last window starts, to start the next shard's decodes), stream them into its shard
    files, rename those into place and commit the shard with its marker. A clip that fails to decode, or whose
    moments float16 cannot hold, is left as fill values and listed in the marker. Returns the marker, or None when
    another writer took the shard over meanwhile (`claim`; nothing renamed after that). A shard that fails to
    write (a full disk) removes its files and its claim and stays uncommitted, so the same command run again
    writes it; a full disk is raised as the OSError of writing the cache."""
    import zarr

    records = plan.clips[shard.bucket][shard.start:shard.stop]
    per_shard = plan.shard_clips or (shard.stop - shard.start)
    bucket = Bucket.parse(shard.bucket)
    rows = np.asarray(zarr.open_array(str(path / shard.bucket / TEXT_ROW), mode="r")[shard.start:shard.stop])
    first_row = shard.number * per_shard
    own = np.flatnonzero((rows >= first_row) & (rows < first_row + per_shard))
    _, first_seen = np.unique(rows[own], return_index=True)
    text_at = {int(own[i]): int(rows[own[i]]) - first_row for i in first_seen}  # clip offset -> text slot
    number = shard.start // per_shard
    files, failed = {}, []
    _remove_shard_files(path, shard, per_shard)  # what an earlier writer of it left (a crash: temporary files)
    try:
        for name in ("mean", "logvar", FIRST_FRAME):
            files[name] = _shard_file(path, f"{shard.bucket}/{name}", number)
        files[TEXT] = _shard_file(path, TEXT, shard.number)
        for lo, window, futures in _decoding_windows(records, bucket, encoder, decoded, ahead):
            encoded = encoder.encode(window, bucket, futures)
            for k, (pair, reason) in enumerate(zip(encoded.moments, encoded.failures)):
                offset, record = lo + k, window[k]
                if pair is not None:
                    reason = moments_problem(pair)
                if reason is None:
                    files["mean"].add(offset, np.asarray(pair[0], np.float16))
                    files["logvar"].add(offset, np.asarray(pair[1], np.float16))
                    files[FIRST_FRAME].add(offset, encoded.first_frames[k])
                else:
                    failed.append({"index": shard.start + offset, "path": record["path"], "reason": reason})
                if offset in text_at:  # the first clip of its caption: the caption's row (failed or not)
                    problem = float16_problem(encoded.text[k])
                    if problem:
                        raise ConfigError("caption", record["path"], f"its T5 embedding {problem}; shard "
                                                                     f"{shard.name} is not committed")
                    files[TEXT].add(text_at[offset], np.asarray(encoded.text[k], np.float16))
        for name in [*files, None]:  # before each rename and the commit: is the shard still this writer's?
            if claim is not None and not claim.owned():
                logger.warning("shard %s was taken over by another writer while this one was silent; leaving it "
                               "to that writer", shard.name)
                for rest in files.values():
                    rest.abort()
                claim.stop()
                return None
            if name is not None:
                files.pop(name).finish()
        marker = {"clips": shard.stop - shard.start, "failed": failed}
        write_text_atomically(path / shard.marker, json.dumps(marker))
    except BaseException as error:
        full = full_disk_error(error, path)
        for file in files.values():
            file.abort()
        if claim is None or claim.owned():
            _remove_shard_files(path, shard, per_shard)
        if claim is not None:
            claim.release()
        if full is not None:
            raise full from error
        raise
    if claim is not None:
        claim.stop()
    return marker


def _remove_shard_files(path: Path, shard: Shard, per_shard: int) -> None:
    """The shard files of an uncommitted shard (and any temporary one beside them)."""
    targets = [(path / shard.bucket / name, shard.start // per_shard) for name in ("mean", "logvar", FIRST_FRAME)]
    for array, number in targets + [(path / TEXT, shard.number)]:
        folder = array / "c" / str(number)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def committed(path: Path) -> dict[str, dict]:
    """marker name -> its content, for every committed shard."""
    root = path / COMMITS
    if not root.is_dir():
        return {}
    return {f"{COMMITS}/{p.parent.name}/{p.name}": json.loads(p.read_text()) for p in root.glob("*/*.json")}


def job_of_environment() -> tuple[int, int]:
    """(this job, jobs) of a SLURM job array (`SLURM_ARRAY_TASK_ID`, `_MIN`, `_STEP`, `_COUNT`); (0, 1) outside."""
    count = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    if count <= 1 or "SLURM_ARRAY_TASK_ID" not in os.environ:
        return 0, 1
    first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    step = int(os.environ.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
    return (int(os.environ["SLURM_ARRAY_TASK_ID"]) - first) // step, count


def shards_of(plan: CachePlan, job: int = 0, jobs: int = 1, rank: int = 0, world_size: int = 1) -> list[Shard]:
    """The shards of a rank: its job's (i mod jobs == job), then every world_size-th of those."""
    return [s for i, s in enumerate(plan.shards) if i % jobs == job][rank::world_size]


def encode_cache(path: Path, plan: CachePlan, encoder: "ClipEncoder", rank: int = 0, world_size: int = 1,
                 progress: bool = True, barrier: Callable[[], None] = lambda: None, job: int = 0, jobs: int = 1,
                 claim_timeout: float = CLAIM_TIMEOUT_S) -> dict:
    """Write this rank's uncommitted shards (`shards_of`; the store exists, the caller's barrier between), each
    claimed first (`claim_shard`: a shard another live writer holds is skipped), decoding the next shard's first
    clips while the VAE encodes this one's last; returns counts for this rank ('left': the shards left to other
    writers)."""
    done = committed(path)
    queue = iter([s for s in shards_of(plan, job, jobs, rank, world_size) if s.marker not in done])
    owner = {"host": socket.gethostname(), "job": job, "jobs": jobs, "rank": rank}
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s.stop - s.start for s in plan.shards), unit="clip", desc="encode", dynamic_ncols=True,
                   initial=sum(m["clips"] for m in done.values()))
    start_decoding = getattr(encoder, "decode_ahead", None)
    left: list[str] = []

    def next_shard():
        for shard in queue:
            claim = claim_shard(path, shard, owner, claim_timeout)
            if claim is None:
                left.append(shard.name)
                continue
            if (path / shard.marker).is_file():  # committed by another writer since this rank listed the markers
                claim.stop()
                continue
            first = plan.clips[shard.bucket][shard.start:min(shard.stop, shard.start + DECODE_WINDOW)]
            return shard, claim, start_decoding(first, Bucket.parse(shard.bucket)) if start_decoding else None
        return None

    started, clips, failed, shards = time.perf_counter(), 0, 0, 0
    upcoming = None
    try:
        upcoming = next_shard()
        while upcoming is not None:
            shard, claim, decoded = upcoming
            upcoming = None

            def ahead() -> None:
                nonlocal upcoming
                upcoming = next_shard()
            marker = write_shard(path, plan, shard, encoder, decoded, claim=claim, ahead=ahead)
            if upcoming is None:  # a shard too small to call `ahead`, or a writer that does not
                upcoming = next_shard()
            if marker is None:
                left.append(shard.name)
                continue
            shards += 1
            clips += marker["clips"]
            failed += len(marker["failed"])
            for failure in marker["failed"]:
                logger.warning("skipped %s: %s", failure["path"], failure["reason"])
            if bar is not None:
                bar.update(marker["clips"] * world_size)  # the other ranks advance alike
                bar.set_postfix(clips_per_s=f"{clips * world_size / (time.perf_counter() - started):.2f}")
    except BaseException as error:  # a claim that does not fit either: the line names the cache
        full = full_disk_error(error, path)
        if full is not None and full is not error:
            raise full from error
        raise
    finally:
        if upcoming is not None:  # an error: the next shard's claim goes, its decodes are dropped
            upcoming[1].release()
            from cogvx_mega.data.encoder import cancel

            cancel(upcoming[2] or [])
    if bar is not None:
        bar.close()
    barrier()
    return {"shards": shards, "clips": clips, "failed": failed, "seconds": time.perf_counter() - started,
            "left": left}


# --- reading -----------------------------------------------------------------------------------------------------

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
    """Every usable clip's arrays (bucket -> mean / logvar / text as float32, in index order) and source paths.
    (Tests and tools; training reads through tensorstore, `cache_reader.py`.)"""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    v1 = group.attrs.get("format") == CACHE_FORMAT_V1
    out = {}
    for bucket, indices in usable_clips(path).items():
        indices = np.asarray(list(indices), dtype=np.int64)
        out[bucket] = {name: np.asarray(group[f"{bucket}/{name}"].oindex[indices], dtype=np.float32)
                       for name in ("mean", "logvar")}
        if v1:
            out[bucket]["text"] = np.asarray(group[f"{bucket}/text"].oindex[indices], dtype=np.float32)
        else:
            rows = np.asarray(group[f"{bucket}/{TEXT_ROW}"].oindex[indices], dtype=np.int64)
            out[bucket]["text"] = np.asarray(group[TEXT].oindex[rows], dtype=np.float32)
        out[bucket]["paths"] = clip_paths(path, bucket, indices.tolist())
    return out
