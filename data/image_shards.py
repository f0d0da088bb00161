"""Images at billion scale, kept as img2dataset and webdataset keep them, and mixed with videos as CogVideoX trains.

The images: tar shards of `KEY.jpg|jpeg|png|webp|bmp` + `KEY.txt` (the caption), optionally `KEY.json` with
"width" and "height" (img2dataset resizes a shard's images to one size and writes it there), thousands of
images a shard. `cogvx data index-images TARS --output INDEX` (`build_image_index`) reads every tar's headers in
parallel threads and writes ONE Parquet row per shard (path, count: its images with a non-empty caption, width and
height, image_sizes: how many image sizes it holds, bytes: the tar's size), never one per image, and `index.json`
(format, shards, images, skipped). A tar that cannot be read is skipped and counted, one line each. A shard's images
go to the bucket of its most common size (from the .json sidecars, else from the image headers); a shard holding
several sizes (`image_sizes` > 1, counted in `mixed_sizes`) has its other images resized and centre-cropped to that
bucket at decode, as every clip is.

Training (`data.images` with `data.image_ratio`): buckets are assigned when the index is opened, from (1, height,
width) with `buckets.bucket_for`, once per distinct size. Image k of a bucket is found by arithmetic: the bucket's
shards in index order and the cumulative sums of their counts (`ShardImages`: np.searchsorted, memory O(shards)).
Where a shard's images and captions lie is read from its tar headers (a ustar/pax header parser, one read a
member; `tarfile` for anything else) the first time one of its images is needed, or ahead of time in background
threads for the shards of the next image steps (`MixedDataset` asks), and the last `OPEN_SHARDS` shards read are
kept. An image's record points into its tar (path, member, offset, size), and `decode.decode_clip` decodes the
member's bytes with the decoder a file on disk goes through, so an image gives the same pixels from a tar as from
its own file. The records go to online mode's dataset (`online.OnlineDataset`), which encodes them with the VAE
and T5 like any clip; an image that does not decode is skipped and replaced there like a broken video, a tar
changed since it was indexed stops the run with one line naming it.

Mixing (`MixedDataset`): step s is an image step or a video step by `order.mixed_step(s, image_ratio)`; each
stream is its own dataset with its own order (`BucketedBatches` over its buckets) numbered by its own steps
(`stream_step`), and the posterior noise stays keyed on the training step s, which belongs to one stream only, so
the two streams never draw the same (seed, step, slot) key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cogvx_mega.checkpoint.atomic import atomic_directory
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.buckets import Bucket, bucket_for
from cogvx_mega.data.cache import CachePlan
from cogvx_mega.data.order import BucketedBatches, mixed_step

logger = logging.getLogger(__name__)

IMAGE_INDEX_FORMAT = "cogvx-mega/image-shards-v1"
INDEX_FILE = "index.json"
SHARDS_FILE = "shards.parquet"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
OPEN_SHARDS = 64
"""Shards whose member tables (where their images and captions lie: about 100 bytes an image) are kept, least
recently used dropped: at least the shards of three steps' images on one rank (`MixedDataset` reads ahead)."""
READ_AHEAD_THREADS = 2
"""Threads reading the member tables of the shards of the next image steps while the current step trains."""
SKIPPED_SHOWN = 100
"""Skipped tars reported one by one in `index.json`; the rest are counted."""


# --- one shard --------------------------------------------------------------------------------------------------


def split_member(name: str) -> tuple[str, str]:
    """A tar member name -> (key, extension), as webdataset splits it: the extension is everything after the
    first dot of the file name (lower case), the key the rest ('a/b.seg.jpg' -> ('a/b', 'seg.jpg'))."""
    folder, _, file = name.rpartition("/")
    stem, dot, extension = file.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (extension.lower() if dot else "")


def caption_text(data: bytes) -> Optional[str]:
    """A KEY.txt member's caption, as `manifest.caption_for` reads a sidecar .txt (UTF-8, a byte-order mark
    dropped, stripped); None when it is empty or not UTF-8 (the image is then not counted)."""
    try:
        text = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return None
    return text or None


@dataclass
class ShardMembers:
    """The images of one tar shard that have a caption, in tar order: where each image's bytes and its caption's
    bytes lie in the tar; with `dimensions`, each image's (width, height) (index time only)."""

    names: list[str]
    offsets: np.ndarray
    lengths: np.ndarray
    """Bytes of each image member."""
    caption_offsets: np.ndarray
    caption_lengths: np.ndarray
    dimensions: Optional[list[Optional[tuple[int, int]]]] = None

    def __len__(self) -> int:
        return len(self.names)


def _json_size(data: bytes) -> Optional[tuple[int, int]]:
    try:
        meta = json.loads(data)
        width, height = meta.get("width"), meta.get("height")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        return width, height
    return None


def _header_size(data: bytes) -> Optional[tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # parses the header only
            return image.size
    except Exception:  # Pillow raises many types for a damaged image; the image is decoded (and skipped) later
        return None


_BLOCK = 512
_REGULAR_FILE = (b"0", b"\0")


def _octal(field: bytes) -> Optional[int]:
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def _pax_records(data: bytes) -> Optional[dict[bytes, bytes]]:
    """The 'LENGTH key=value\\n' records of a pax extended header; None when they do not parse."""
    records, position = {}, 0
    try:
        while position < len(data) and data[position:position + 1] != b"\0":
            length = int(data[position:data.index(b" ", position)])
            record = data[position:position + length]
            key, equals, value = record[record.index(b" ") + 1:-1].partition(b"=")
            if length < 5 or not equals or record[-1:] != b"\n":
                return None
            records[key] = value
            position += length
    except ValueError:
        return None
    return records


def _raw_members(path: str | os.PathLike) -> Optional[list[tuple[str, int, int, bytes]]]:
    """(name, data offset, size, the first bytes of its data) of every regular file of a ustar or pax tar (what
    webdataset and img2dataset write: a pax header before each member, for its mtime), from its 512-byte headers,
    one read each: several times faster than `tarfile` at 30,000 members. None when the tar holds anything else
    (GNU long names, a global pax header, links, a bad checksum, sizes in base-256), which `tarfile` then reads.
    tarfile.ReadError when it ends inside a member."""
    members, pax = [], {}
    with open(path, "rb") as file:
        descriptor = file.fileno()
        end = os.fstat(descriptor).st_size
        offset = 0
        while offset < end:
            block = os.pread(descriptor, 2 * _BLOCK, offset)  # the header and, for a caption, its text
            header = block[:_BLOCK]
            if len(header) < _BLOCK:
                raise tarfile.ReadError("truncated header")
            if header.count(0) == _BLOCK:
                break  # the end-of-archive blocks
            checksum, size = _octal(header[148:156]), _octal(header[124:136])
            if checksum is None or size is None or checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
                return None
            kind = header[156:157]
            data = offset + _BLOCK
            if kind == b"x":  # a pax header: its path and size replace those of the next member
                text = block[_BLOCK:_BLOCK + size] if size <= _BLOCK else os.pread(descriptor, size, data)
                records = _pax_records(text)
                if records is None or len(text) < size:
                    return None
                pax = records
            elif kind in _REGULAR_FILE or kind == b"5":
                name = header[:100].split(b"\0", 1)[0]
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""  # POSIX
                name = pax.get(b"path") or ((prefix + b"/" + name) if prefix else name)
                try:
                    size = int(pax[b"size"]) if b"size" in pax else size
                except ValueError:
                    return None
                pax = {}
                if kind in _REGULAR_FILE:
                    members.append((name.decode("utf-8", "surrogateescape"), data, size,
                                    block[_BLOCK:_BLOCK + size]))
            else:
                return None
            if data + size > end:
                raise tarfile.ReadError("unexpected end of data")
            offset = data + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    return members


def _tarfile_members(path: str | os.PathLike) -> list[tuple[str, int, int, bytes]]:
    with tarfile.open(path, mode="r:") as tar:
        return [(info.name, info.offset_data, info.size, b"") for info in tar if info.isfile()]


def read_shard(path: str | os.PathLike, with_sizes: bool = False) -> ShardMembers:
    """The captioned images of a tar shard, from its headers and its KEY.txt members (members of one key grouped
    as webdataset groups them; a key's first image member is its image). `with_sizes`: also each image's size,
    from KEY.json ("width", "height") or else its image header. Raises tarfile.TarError, OSError or EOFError when
    the tar cannot be read."""
    listed = _raw_members(path)
    if listed is None:
        listed = _tarfile_members(path)
    groups: dict[str, dict[str, tuple[str, int, int, bytes]]] = {}
    for member in listed:
        key, extension = split_member(member[0])
        group = groups.setdefault(key, {})
        if extension and extension not in group:
            group[extension] = member
    names, offsets, lengths, caption_offsets, caption_lengths, dimensions = [], [], [], [], [], []
    with open(path, "rb") as file:
        def content(member) -> bytes:
            _, offset, size, start = member
            if len(start) == size:
                return start
            return os.pread(file.fileno(), size, offset)

        for key, group in groups.items():
            image = next((member for extension, member in group.items() if extension in IMAGE_EXTENSIONS), None)
            caption = caption_text(content(group["txt"])) if "txt" in group else None
            if image is None or caption is None:
                continue
            names.append(image[0])
            offsets.append(image[1])
            lengths.append(image[2])
            caption_offsets.append(group["txt"][1])
            caption_lengths.append(group["txt"][2])
            if with_sizes:
                size = _json_size(content(group["json"])) if "json" in group else None
                dimensions.append(size or _header_size(content(image)))
    return ShardMembers(names, *(np.asarray(v, np.int64) for v in (offsets, lengths, caption_offsets, caption_lengths)),
                        dimensions if with_sizes else None)


def shard_row(path: Path) -> dict:
    """The index row of one tar: path, count, width and height (its most common image size), image_sizes (how
    many sizes it holds), bytes. ValueError with the reason when it cannot be used."""
    try:
        size = path.stat().st_size
        members = read_shard(path, with_sizes=True)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"not a readable tar ({type(error).__name__}: {error})") from None
    if not len(members):
        raise ValueError("holds no image with a caption (KEY.jpg|png|webp with a non-empty KEY.txt)")
    known = Counter(d for d in members.dimensions if d is not None)
    if not known:
        raise ValueError("none of its images has a readable size (no KEY.json width/height, no image header)")
    (width, height), _ = known.most_common(1)[0]
    return {"path": str(path.resolve()), "count": len(members), "width": width, "height": height,
            "image_sizes": len(known), "bytes": size}


# --- the index --------------------------------------------------------------------------------------------------


def tar_files(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """The tars to index: each source a .tar file, or a folder whose .tar files (at any depth, sorted) are."""
    files = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.tar") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError("TAR", str(source), "no such file or folder; pass .tar shards or folders of them")
    return files


def build_image_index(sources: Sequence[str | os.PathLike], output: str | os.PathLike, workers: int = 8,
                      progress: bool = False) -> tuple["ImageShardIndex", list[str]]:
    """Index the tar shards of `sources` into the folder `output` (written whole or not at all, replacing what is
    there: the CLI refuses an existing output without --overwrite): one row per shard. Returns the index and the
    'skipped TAR: reason' line of each tar left out (never fatal, unless no tar is left)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    output = Path(output)
    files = tar_files(sources)
    if not files:
        raise ConfigError("TAR", [str(s) for s in sources], "holds no .tar file")

    def one(path: Path):
        try:
            return shard_row(path)
        except ValueError as error:
            return f"skipped {path}: {error}"

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), unit="shard", desc="index-images", dynamic_ncols=True)
    rows, skipped = [], []
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="cogvx-index-images") as pool:
        for result in pool.map(one, files):  # tarfile and Pillow release the GIL while reading
            (rows if isinstance(result, dict) else skipped).append(result)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if not rows:
        raise ConfigError("TAR", [str(s) for s in sources], f"none of its {len(files)} tars could be indexed (e.g. "
                                                            f"{skipped[0].removeprefix('skipped ')}); nothing written")
    table = pa.Table.from_pydict({name: [row[name] for row in rows] for name in rows[0]},
                                 schema=pa.schema([("path", pa.string()), ("count", pa.int64()),
                                                   ("width", pa.int64()), ("height", pa.int64()),
                                                   ("image_sizes", pa.int64()), ("bytes", pa.int64())]))
    with atomic_directory(output) as tmp:
        pq.write_table(table, tmp / SHARDS_FILE, compression="zstd")
        made_from = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
        meta = {"format": IMAGE_INDEX_FORMAT, "shards": len(rows), "images": sum(r["count"] for r in rows),
                "mixed_sizes": sum(r["image_sizes"] > 1 for r in rows), "skipped": len(skipped),
                "skipped_examples": skipped[:SKIPPED_SHOWN], "file": SHARDS_FILE,
                "bytes": (tmp / SHARDS_FILE).stat().st_size, "fingerprint": made_from}
        (tmp / INDEX_FILE).write_text(json.dumps(meta, indent=1))
    return ImageShardIndex.open(output), skipped


class ImageShardIndex:
    """An image index folder: per shard (row) its path, image count, size and bytes, as arrays (the paths an
    Arrow string array: no Python object per shard either). `record(row, number)` is the record of one image,
    read from the shard's tar headers (kept for the last `OPEN_SHARDS` shards); `read_ahead(rows)` reads shards
    in background threads before a step needs them."""

    def __init__(self, folder: Path, meta: dict, table):
        self.folder, self.meta = folder, meta
        self.paths = table.column("path").combine_chunks()
        self.counts, self.widths, self.heights, self.bytes = (
            table.column(name).to_numpy() for name in ("count", "width", "height", "bytes"))
        self.fingerprint: str = meta["fingerprint"]
        self._open: OrderedDict[int, ShardMembers] = OrderedDict()
        self._reading: dict[int, Future] = {}
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, folder: str | os.PathLike, flag: str = "data.images") -> "ImageShardIndex":
        import pyarrow.parquet as pq

        folder = Path(folder)
        try:
            meta = json.loads((folder / INDEX_FILE).read_text())
        except FileNotFoundError:
            raise ConfigError(flag, str(folder), f"no image index there (no {INDEX_FILE}); build one with `cogvx "
                                                 f"data index-images TARS --output {folder}`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(flag, str(folder / INDEX_FILE), f"is damaged ({error}); index the shards again") from None
        if not isinstance(meta, dict) or meta.get("format") != IMAGE_INDEX_FORMAT:
            raise ConfigError(flag, str(folder), f"not an image index ({IMAGE_INDEX_FORMAT}); build one with `cogvx "
                                                 f"data index-images TARS --output INDEX`")
        file = folder / meta["file"]
        size = file.stat().st_size if file.is_file() else None
        if size != meta["bytes"]:
            raise ConfigError(flag, str(file), f"is {'missing' if size is None else 'damaged'} ({size} bytes, the "
                                               f"index lists {meta['bytes']}); index the shards again")
        return cls(folder, meta, pq.read_table(file))

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def images(self) -> int:
        return int(self.counts.sum())

    def path(self, row: int) -> str:
        return self.paths[int(row)].as_py()

    def read_ahead(self, rows) -> None:
        """Start reading the member tables of these shards in background threads (those not read yet)."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(READ_AHEAD_THREADS, thread_name_prefix="cogvx-image-shards")
            for row in dict.fromkeys(int(r) for r in np.asarray(rows).reshape(-1)):
                if row not in self._open and row not in self._reading:
                    self._reading[row] = self._pool.submit(self._read, row)

    def members(self, row: int) -> ShardMembers:
        """The images of shard `row` (read from its tar the first time, or by `read_ahead`); a clear error when the
        tar is gone or changed since it was indexed (another size, or other images)."""
        row = int(row)
        with self._lock:
            if row in self._open:
                self._open.move_to_end(row)
                return self._open[row]
            reading = self._reading.get(row)
        try:
            members = reading.result() if reading is not None else self._read(row)
        finally:
            with self._lock:
                self._reading.pop(row, None)
        with self._lock:
            self._open[row] = members
            while len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        return members

    def _read(self, row: int) -> ShardMembers:
        path = self.path(row)
        again = f"index the shards again with `cogvx data index-images` (index: {self.folder})"
        try:
            size = os.stat(path).st_size
        except OSError as error:
            raise ConfigError("data.images", path, f"cannot be read any more ({error.strerror}); {again}") from None
        if size != int(self.bytes[row]):
            raise ConfigError("data.images", path, f"is {size} bytes, not the {int(self.bytes[row])} it had when it "
                                                   f"was indexed (truncated or rewritten since); {again}")
        try:
            members = read_shard(path)
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ConfigError("data.images", path, f"is not a readable tar any more ({error}); {again}") from None
        if len(members) != int(self.counts[row]):
            raise ConfigError("data.images", path, f"holds {len(members)} captioned images, the index lists "
                                                   f"{int(self.counts[row])}; {again}")
        return members

    def record(self, row: int, number: int) -> dict:
        """Image `number` of shard `row` as a manifest record pointing into the tar, with its caption."""
        members, path = self.members(row), self.path(row)
        with open(path, "rb") as file:
            file.seek(int(members.caption_offsets[number]))
            caption = caption_text(file.read(int(members.caption_lengths[number])))
        if caption is None:
            raise ConfigError("data.images", path, f"the caption of {members.names[number]} changed since the tar was "
                                                   f"indexed; index the shards again with `cogvx data index-images`")
        return {"path": path, "member": members.names[number], "offset": int(members.offsets[number]),
                "size": int(members.lengths[number]), "caption": caption, "kind": "image", "frames": 1,
                "width": int(self.widths[row]), "height": int(self.heights[row])}

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._reading.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class ShardImages(Sequence):
    """The images of one bucket: its shards (`rows`, in order) one after another, image k found by a binary
    search over the cumulative counts. Memory O(shards of the bucket)."""

    def __init__(self, index: ImageShardIndex, rows: np.ndarray):
        self.index, self.rows = index, np.asarray(rows, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(index.counts[self.rows])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(shard rows, image numbers within them) of bucket positions (an int or an array)."""
        positions = np.asarray(positions, np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions must lie in [0, {len(self)})")
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        return self.rows[shard], positions - self.starts[shard]

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        position = item + len(self) if item < 0 else item
        row, number = self.locate(position)
        return self.index.record(int(row), int(number))

    def read_ahead(self, positions) -> None:
        """Read the shards of these positions in the background (`ImageShardIndex.read_ahead`)."""
        self.index.read_ahead(self.locate(positions)[0])


def image_plan(index: ImageShardIndex, bucket_names: Sequence[str],
               merge_below: Optional[int] = None) -> tuple[CachePlan, list[str]]:
    """The plan of an image index for online mode: each 1-frame bucket of `bucket_names` -> `ShardImages` of the
    shards whose size goes there (`buckets.bucket_for(1, height, width)`, once per distinct size), and notes to
    log. `merge_below` (data.small_buckets=merge: the global batch): the shards of a bucket holding fewer images
    go to the nearest bucket that holds at least that many, after its own shards."""
    buckets = [Bucket.parse(name) for name in bucket_names]
    images = [b for b in buckets if b.frames == 1]
    keys = (index.heights.astype(np.int64) << 21) | index.widths.astype(np.int64)
    distinct, inverse = np.unique(keys, return_inverse=True)
    mask = (1 << 21) - 1
    chosen = [bucket_for(1, int(k >> 21), int(k & mask), images) for k in distinct]
    number = np.array([images.index(b) if b is not None else -1 for b in chosen], np.int64)[inverse.reshape(-1)]
    notes = []
    if (number < 0).any():
        notes.append(f"data.images: {int((number < 0).sum())} shards ({int(index.counts[number < 0].sum())} images) "
                     f"fit no 1-frame bucket of data.buckets and are not trained on")
    counts = {b.name: int(index.counts[number == i].sum()) for i, b in enumerate(images)}
    merged: dict[str, dict[str, int]] = {}
    rows = {b.name: np.flatnonzero(number == i) for i, b in enumerate(images)}
    if merge_below:
        large = [b for b in images if counts[b.name] >= merge_below]
        for small in images:
            if not large or not 0 < counts[small.name] < merge_below:
                continue
            moved = rows[small.name]
            rows[small.name] = moved[:0]
            for row in moved:  # every image fits every 1-frame bucket: the nearest one that fills a batch
                target = bucket_for(1, int(index.heights[row]), int(index.widths[row]), large).name
                rows[target] = np.append(rows[target], row)
                into = merged.setdefault(small.name, {})
                into[target] = into.get(target, 0) + int(index.counts[row])
    clips = {name: ShardImages(index, shard_rows) for name, shard_rows in rows.items()}
    return CachePlan(clips=clips, unfit=[], shards=[], fingerprint=index.fingerprint, merged=merged), notes


# --- mixing images with videos ----------------------------------------------------------------------------------


def stream_step(step: int, image_ratio: float, images: bool) -> int:
    """The step of one stream's order that training step s reads: for a step of that stream its number there
    (`order.mixed_step`), for a step of the other stream the number of this stream's next step (what its
    prefetch wants)."""
    is_image, number = mixed_step(step, image_ratio)
    images_before = number if is_image else step - number  # image steps among steps 0..s-1
    return images_before if images else step - images_before


def split_plan(plan: CachePlan, images: bool) -> CachePlan:
    """The plan of one stream: the 1-frame buckets (`images`) or the others, with the merges into them."""
    def wanted(name: str) -> bool:
        return (Bucket.parse(name).frames == 1) == images

    return dataclasses.replace(plan, clips={name: clips for name, clips in plan.clips.items() if wanted(name)},
                               merged={small: into for small, into in plan.merged.items() if wanted(small)})


class MixedDataset:
    """Image steps and video steps at `image_ratio` (see the module docstring): `step_batch` goes to the stream of
    the step, whose order reads its own stream's steps. `images`, `videos`: the streams' datasets (each a
    `BucketedBatches` whose `batch_of_step(s)` reads `stream_step(s)`), None for a stream that has no step."""

    def __init__(self, images, videos, image_ratio: float, global_batch: int,
                 images_from: tuple[str, object] = ("data.source", None),
                 videos_from: tuple[str, object] = ("data.source", None)):
        """`images_from`, `videos_from`: (field, value) where each stream comes from, for the error of a stream
        that never fills a global batch."""
        self.images, self.videos, self.image_ratio = images, videos, float(image_ratio)
        mixed_step(0, self.image_ratio)  # checks the ratio
        for name, stream, share, (field, value) in (("image", images, self.image_ratio, images_from),
                                                    ("video", videos, 1 - self.image_ratio, videos_from)):
            if share <= 0:
                continue
            clips = stream.bucket_clips() if stream is not None else {}
            if not any(count >= global_batch for count in clips.values()):
                sizes = ", ".join(f"{bucket}: {count}" for bucket, count in clips.items()) or "no clips"
                raise ConfigError(field, value, f"data.image_ratio={self.image_ratio} trains {name} steps, but no "
                                               f"{name} bucket fills a global batch of {global_batch} ({sizes}); "
                                               f"add {name}s, lower training.global_batch_size, or set "
                                               f"data.image_ratio={1.0 if name == 'video' else 0.0}")

    def is_image_step(self, step: int) -> bool:
        return mixed_step(step, self.image_ratio)[0]

    def stream_of(self, step: int):
        """The dataset that gives step `step`."""
        return self.images if self.is_image_step(step) else self.videos

    def _streams(self) -> list:
        return [s for s in (self.videos, self.images) if s is not None]

    def batch_of_step(self, step: int, global_batch: int, seed: int) -> tuple[str, list[int]]:
        return self.stream_of(step).batch_of_step(step, global_batch, seed)

    def step_batch(self, step: int, slots: range, global_batch: int, seed: int) -> dict:
        batch = self.stream_of(step).step_batch(step, slots, global_batch, seed)
        self._read_ahead(step, slots, global_batch, seed)
        return batch

    def _read_ahead(self, step: int, slots: range, global_batch: int, seed: int) -> None:
        """Image shards (`ShardImages`): read the shards of this rank's images of the image stream's next two
        batches in the background, so that neither the next image step nor the decodes it starts ahead wait for
        a tar's headers."""
        if self.images is None or not self.image_ratio or not hasattr(self.images, "plan"):
            return
        image_step = stream_step(step + 1, self.image_ratio, images=True)  # the stream's next batch
        for ahead in (image_step, image_step + 1):
            bucket, clips = BucketedBatches.batch_of_step(self.images, ahead, global_batch, seed)
            read_ahead = getattr(self.images.plan.clips[bucket], "read_ahead", None)
            if read_ahead is not None:
                read_ahead(clips[slots.start:slots.stop])

    def bucket_clips(self) -> dict[str, int]:
        clips = {}
        for stream in self._streams():
            clips.update(stream.bucket_clips())
        return clips

    @property
    def merged(self) -> dict[str, dict[str, int]]:
        merged = {}
        for stream in self._streams():
            merged.update(getattr(stream, "merged", None) or {})
        return merged

    @property
    def skipped(self) -> dict:
        skipped = {}
        for stream in self._streams():
            skipped.update(getattr(stream, "skipped", None) or {})
        return skipped

    @property
    def provides_image_latents(self) -> bool:
        return all(getattr(stream, "provides_image_latents", False) for stream in self._streams())

    def __len__(self) -> int:
        return sum(len(stream) for stream in self._streams())

    def close(self) -> None:
        for stream in self._streams():
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        for clips in (self.images.plan.clips.values() if self.images is not None else ()):
            if isinstance(clips, ShardImages):
                clips.index.close()
