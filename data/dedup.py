"""Exact and near-duplicate clips of a manifest (`cogvx data dedup`): what is compared, and how groups are found.

A clip's signature is the 64-bit perceptual hash (pHash) of K frames (default 4) spread evenly over its
[start, end]: frame k is the one on screen at start + (k + 1/2) * duration / K, found by time, so copies at another
frame rate, keyframe interval or container line up. pHash is the one imagehash and the pHash library define: the
frame in greyscale, resized to 32x32 (Lanczos), its 2-D DCT-II, the 8x8 lowest frequencies, each bit "above their
median". It survives re-encoding, another bitrate or codec, resizing and mild colour changes; it does not survive
crops, flips, overlays or a shift in time (a clip cut a second later is another clip here). An image is a clip of
one frame, compared only with images.

Two clips are duplicates when
- exact: the same bytes (size and BLAKE2b-128 of the file, or of the tar member) and the same [start, end]; found
  by grouping on the key, no comparison;
- near: the mean Hamming distance of their aligned frame hashes is at most the threshold (default 8 of 64 bits).

Near pairs are found without comparing all pairs: each distinct signature is put in K * 4 buckets, one per
(frame, 16-bit band of that frame's hash), and only signatures sharing a bucket are compared (exactly, with the
mean over all K frames). Two clips whose hashes differ by at most 3 bits on some frame share a bucket (4 bands,
pigeonhole), which is what a re-encoded copy looks like; a pair at the threshold whose every frame differs by 4 or
more bits can be missed. Cost: O(N K log N) to sort the N distinct signatures into K * 4 bucket lists, plus the
pairs inside buckets, ~N^2 / 2^17 per (frame, band) for spread-out hashes: ~10^8 vectorised comparisons at 10^6
clips (200k random signatures: 2 s). A bucket holding more than `MAX_BUCKET` signatures (frames of one flat colour,
a fade to black shared by thousands of clips) is not expanded: its members are still compared through their other
frames' buckets. Groups are the connected components of the duplicate pairs (union-find), so a
chain A~B~C is one group even where A and C are further apart than the threshold.

One clip of each group is kept: the most pixels (width x height), then the longest, then the first in manifest
order (the best copy, then a stable choice).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cogvx_mega.data.manifest import IMAGE_SUFFIXES, MediaError, _import_av

HASH_VERSION = "phash64-dct32-v1"
"""What a cached signature was computed with: another value is computed again."""
DEFAULT_FRAMES = 4
DEFAULT_THRESHOLD = 8.0
"""Mean Hamming distance (bits of 64) at or below which two clips are near-duplicates. Measured on 40 textured,
panning 2 s clips at 256x144 (H.264 CRF 18) and 4 re-encodes of 15 of them: VP9 at 60 kb/s and half size 0.5 mean
(1.0 worst), H.264 CRF 30 at twice the size 0.8 (1.5), H.264 CRF 45 at half the frame rate 2.7 (4.5), MJPEG q 20
at a quarter of the size 4.0 (6.0); the 780 pairs of different clips 31.5 median, 16.5 the closest. 8 keeps 2 bits
over the worst re-encode and 8.5 under the closest different pair; single-image pHash practice uses 8-10."""
BANDS = 4
"""16-bit bands of each frame hash that bucket candidates (a shared band makes a pair a candidate)."""
MAX_BUCKET = 2000
DECODE_SIDE = 256
"""Frames are decoded, then shrunk to at most this side before hashing (the hash looks at 32x32)."""
PAIRS_AT_ONCE = 1 << 20
SMALL_BUCKET = 64
"""Buckets up to this size are compared together, vectorised over all of them."""


def media_kind(record: dict) -> str:
    if record.get("kind") == "image" or Path(record["path"]).suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    return "video"


def clip_duration(record: dict) -> float:
    """Seconds between the clip's start and end (the whole file without them); 0 for an image."""
    if media_kind(record) == "image":
        return 0.0
    fps, frames = record.get("fps") or 0.0, record.get("frames") or 0
    whole = frames / fps if fps else 0.0
    start = record.get("start") or 0.0
    end = record.get("end") if record.get("end") is not None else whole
    return max(0.0, end - start)


def clip_times(record: dict, count: int) -> list[float]:
    """Seconds from the stream's start of the `count` frames spread over the clip (the middle of each 1/count)."""
    start = record.get("start") or 0.0
    duration = clip_duration(record)
    return [start + duration * (k + 0.5) / count for k in range(count)]


def sample_frames(record: dict, count: int, max_side: Optional[int] = None) -> list:
    """`count` RGB PIL images spread over the clip (one for an image), each shrunk to at most `max_side` pixels on
    its long side when given. A video is read by seeking to each time (the keyframe before it, then decoding up to
    the frame on screen then), never decoding the whole file. MediaError when the clip cannot be read."""
    from cogvx_mega.data.decode import open_media

    if media_kind(record) == "image":
        from PIL import Image

        try:
            with Image.open(open_media(record)) as image:
                return [shrink(image.convert("RGB"), max_side)]
        except OSError as error:
            raise MediaError(f"not a readable image ({error})") from None
    if record.get("member"):
        raise MediaError("only images are read from inside a tar shard")
    av = _import_av()
    frames = []
    try:
        with av.open(record["path"]) as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            for time in clip_times(record, count):
                frames.append(frame_at(container, stream, origin + time, max_side))
    except MediaError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as error:
        raise MediaError(f"decoding failed ({type(error).__name__}: {error})") from None
    return frames


def frame_at(container, stream, time: float, max_side: Optional[int]):
    """The frame on screen at `time` (seconds, the stream's clock): the last one that starts at or before it."""
    container.seek(max(0, int(time / float(stream.time_base))), stream=stream, backward=True, any_frame=False)
    chosen = None
    for frame in container.decode(stream):
        if frame.time is None:
            continue
        if frame.time <= time + 1e-6:
            chosen = frame
            continue
        if chosen is None:  # the seek landed after the time: the first frame there
            chosen = frame
        break
    if chosen is None:
        raise MediaError(f"no frame at {time:.2f}s (the file ends early)")
    return to_image(chosen, max_side)


def to_image(frame, max_side: Optional[int]):
    width, height = frame.width, frame.height
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
        return frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_image()
    return frame.to_image()


def shrink(image, max_side: Optional[int]):
    if max_side and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    return image


_DCT = 2.0 * np.cos(np.pi * np.arange(32)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)
"""DCT-II of length 32 as a matrix (scipy.fftpack.dct's unnormalised form, as imagehash uses)."""


def phash(image) -> int:
    """The 64-bit perceptual hash of a PIL image (imagehash.phash's definition), as an int."""
    from PIL import Image

    pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:8, :8]
    bits = (low > np.median(low)).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 counts them natively)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    bits = np.unpackbits(np.ascontiguousarray(values).view(np.uint8).reshape(*values.shape, 8), axis=-1)
    return bits.sum(axis=-1)


def hamming(a: Sequence[int], b: Sequence[int]) -> float:
    """Mean Hamming distance of two signatures frame by frame (inf when their lengths differ)."""
    if len(a) != len(b) or not a:
        return math.inf
    return sum((x ^ y).bit_count() for x, y in zip(a, b)) / len(a)


def media_digest(record: dict) -> tuple[int, str]:
    """(size, BLAKE2b-128 hex) of the clip's bytes: its file, or its member of a tar."""
    from cogvx_mega.data.decode import open_media

    source = open_media(record)
    digest = hashlib.blake2b(digest_size=16)
    size = 0
    with (open(source, "rb") if isinstance(source, str) else source) as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def clip_key(record: dict) -> str:
    """What names a clip in the hash cache: its path, tar member and [start, end]."""
    return json.dumps([record["path"], record.get("member"), record.get("start"), record.get("end")])


def file_stamp(record: dict) -> tuple[int, int]:
    """(size, modification time in ns) of the clip's file: a cached signature holds only while these do."""
    status = os.stat(record["path"])
    return status.st_size, status.st_mtime_ns


def hash_clip(record: dict, frames: int) -> dict:
    """The cache entry of one clip: its key, file stamp, digest and frame hashes (16 hex digits each), or `error`
    (the reason) when it cannot be read as media. OSError (the file cannot be read at all) is raised."""
    size, mtime = file_stamp(record)
    entry = {"key": clip_key(record), "version": HASH_VERSION, "frames": frames, "size": size, "mtime_ns": mtime}
    try:
        entry["bytes"], entry["digest"] = media_digest(record)
        entry["hashes"] = [f"{phash(image):016x}" for image in sample_frames(record, frames, DECODE_SIDE)]
    except MediaError as error:
        entry.pop("digest", None)
        entry["error"] = str(error)
    return entry


class HashCache:
    """Signatures kept in a JSONL file (`OUTPUT.hashes.jsonl`), one entry a line, appended and flushed as each clip
    is hashed: a run killed part way computes only what is missing. A line cut short by the kill is dropped when
    the file is opened again. An entry is used while its clip's file has the same size and modification time and
    it was made with the same frame count and hash (`HASH_VERSION`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.file = None
        if self.path.is_file():
            keep = 0
            with open(self.path, "rb") as file:
                for raw in file:
                    if not raw.endswith(b"\n"):
                        break
                    try:
                        entry = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        break
                    keep += len(raw)
                    if isinstance(entry, dict) and "key" in entry:
                        self.entries[entry["key"]] = entry
            if keep != self.path.stat().st_size:
                os.truncate(self.path, keep)  # what a kill cut short, and anything after it

    def lookup(self, record: dict, frames: int) -> Optional[dict]:
        entry = self.entries.get(clip_key(record))
        if entry is None or entry.get("version") != HASH_VERSION or entry.get("frames") != frames:
            return None
        try:
            if (entry["size"], entry["mtime_ns"]) != file_stamp(record):
                return None
        except OSError:
            return None
        return entry

    def add(self, entry: dict) -> None:
        line = json.dumps(entry) + "\n"
        with self.lock:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8")
            self.file.write(line)
            self.file.flush()
            self.entries[entry["key"]] = entry

    def close(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()
                self.file = None


@dataclass
class Duplicate:
    line: int
    exact: bool
    distance: Optional[float]
    """Mean Hamming distance to the kept clip (bits of 64); None where one of them has no signature."""


@dataclass
class Group:
    kept: int
    """The manifest line (0-based) kept."""
    dropped: list[Duplicate] = field(default_factory=list)


@dataclass
class GroupStats:
    exact: int = 0
    near: int = 0
    compared: int = 0
    """Signature pairs compared inside buckets."""
    skipped_buckets: int = 0


class UnionFind:
    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def keep_rank(record: dict, line: int) -> tuple:
    """Larger is kept: the most pixels, then the longest, then the first line."""
    return ((record.get("width") or 0) * (record.get("height") or 0), clip_duration(record), -line)


def find_groups(records: Sequence[dict], entries: Sequence[Optional[dict]], threshold: float = DEFAULT_THRESHOLD,
                max_bucket: int = MAX_BUCKET) -> tuple[list[Group], GroupStats]:
    """The duplicate groups of `records` (manifest order) given their cache entries (None or with `error` for a
    clip that could not be read: it is in no group). Each group: the line kept and the lines dropped."""
    count = len(records)
    sets = UnionFind(count)
    stats = GroupStats()
    exact_key: list[Optional[tuple]] = [None] * count
    signature: list[Optional[tuple[int, ...]]] = [None] * count
    first_of: dict[tuple, int] = {}
    for line, entry in enumerate(entries):
        if entry is None or "error" in entry:
            continue
        record = records[line]
        key = (entry["bytes"], entry["digest"], record.get("start"), record.get("end"))
        exact_key[line] = key
        signature[line] = tuple(int(value, 16) for value in entry["hashes"])
        if key in first_of:
            sets.union(first_of[key], line)
        else:
            first_of[key] = line
    # near: one line per distinct signature (exact copies and equal signatures joined here), then LSH buckets
    by_signature: dict[tuple[int, ...], int] = {}
    for line in first_of.values():
        sig = signature[line]
        if sig in by_signature:
            sets.union(by_signature[sig], line)
        else:
            by_signature[sig] = line
    by_length: dict[int, list[tuple[int, ...]]] = {}
    for sig in by_signature:
        by_length.setdefault(len(sig), []).append(sig)
    for length, sigs in by_length.items():
        lines = np.array([by_signature[sig] for sig in sigs], dtype=np.int64)
        table = np.array(sigs, dtype=np.uint64).reshape(len(sigs), length)

        def join(a: np.ndarray, b: np.ndarray) -> None:
            """Compare rows a[i] and b[i] of the table; join the lines of the pairs within the threshold."""
            distance = popcount(table[a] ^ table[b]).mean(axis=-1)
            stats.compared += len(a)
            for i in np.nonzero(distance <= threshold)[0]:
                sets.union(int(lines[a[i]]), int(lines[b[i]]))

        for frame in range(length):
            for band in range(BANDS):
                values = (table[:, frame] >> np.uint64(16 * band)) & np.uint64(0xFFFF)
                order = np.argsort(values, kind="stable")
                ordered = values[order]
                starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
                sizes = np.diff(np.r_[starts, len(order)])
                stats.skipped_buckets += int((sizes > max_bucket).sum())
                # small buckets, all at once: the pairs d apart in sorted order inside one bucket, d = 1, 2, ...
                small = np.repeat((sizes >= 2) & (sizes <= SMALL_BUCKET), sizes)
                rows, bucket = order[small], np.repeat(np.arange(len(sizes)), sizes)[small]
                for d in range(1, SMALL_BUCKET):
                    same = np.flatnonzero(bucket[:-d] == bucket[d:])
                    if not len(same):
                        break
                    join(rows[same], rows[same + d])
                # larger ones, a block of rows against the bucket at a time
                for start, size in zip(starts[(sizes > SMALL_BUCKET) & (sizes <= max_bucket)],
                                       sizes[(sizes > SMALL_BUCKET) & (sizes <= max_bucket)]):
                    members = order[start:start + size]
                    a, b = np.triu_indices(size, 1)  # the pairs i < j of the bucket
                    for begin in range(0, len(a), PAIRS_AT_ONCE):
                        join(members[a[begin:begin + PAIRS_AT_ONCE]], members[b[begin:begin + PAIRS_AT_ONCE]])
    members: dict[int, list[int]] = {}
    for line in range(count):
        if signature[line] is not None:
            members.setdefault(sets.find(line), []).append(line)
    groups = []
    for lines in members.values():
        if len(lines) < 2:
            continue
        kept = max(lines, key=lambda line: keep_rank(records[line], line))
        group = Group(kept)
        for line in lines:
            if line == kept:
                continue
            exact = exact_key[line] == exact_key[kept]
            distance = 0.0 if exact else hamming(signature[line], signature[kept])
            group.dropped.append(Duplicate(line, exact, None if math.isinf(distance) else distance))
            stats.exact += exact
            stats.near += not exact
        groups.append(group)
    groups.sort(key=lambda group: group.kept)
    return groups, stats
