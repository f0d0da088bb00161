"""The clip index: a manifest as columns on disk, grouped by bucket, read only where a step needs it.

`cogvx data index MANIFEST --output INDEX` (and every command given a manifest, into a temporary folder) reads the
JSONL manifest in blocks with pyarrow's streaming JSON reader, gives each line its bucket (`buckets.bucket_for`,
called once per distinct (usable frames, height, width) of the block, so the rule is the one of
`buckets.assign_bucket` exactly) and writes the block's usable lines as one Parquet file, sorted by bucket (stable:
manifest order within a bucket), with every column of the manifest kept (a user's scores and labels travel along).
Memory grows with the block, never with the corpus.

`index.json` lists the parts and, per part, where each bucket's rows lie. Clip i of bucket b is found by
arithmetic over those counts: bucket b's clips are its rows in part 0, then in part 1, ... (manifest order), and
with data.small_buckets=merge the clips moved into it follow (`merged.parquet`, as `buckets.merge_small_buckets`
orders them). In memory per clip: nothing; a rank reads the rows of the clips it encodes or decodes, in row
groups of `ROW_GROUP_ROWS`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cogvx_mega.checkpoint.atomic import atomic_directory
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.buckets import Bucket, bucket_for, merge_targets
from cogvx_mega.data.manifest import parse_manifest_line

logger = logging.getLogger(__name__)

INDEX_FORMAT = "cogvx-mega/clip-index-v1"
INDEX_FILE = "index.json"
MERGED_FILE = "merged.parquet"
ROW_GROUP_ROWS = 4096
"""Rows per Parquet row group: what one clip lookup reads (a few hundred KB with long captions)."""
BLOCK_BYTES = 64 << 20
"""Manifest bytes parsed at a time: the memory of a build."""
# the manifest columns the index needs typed alike in every block (others are inferred)
KNOWN_COLUMNS = {"path": "string", "caption": "string", "kind": "string", "container": "string", "codec": "string",
                 "fps": "float64", "frames": "int64", "width": "int64", "height": "int64", "start": "float64",
                 "end": "float64"}
SKIPPED_SHOWN = 100
"""Skipped lines reported one by one; the rest are counted."""


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.json  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the extra
        raise ConfigError("--data", None, "the clip index needs pyarrow: pip install -e .[data]") from error
    return pyarrow


class _HashingReader:
    """A binary file whose bytes are hashed as pyarrow reads them: the fingerprint costs no second pass."""

    def __init__(self, file):
        self.file, self.digest, self.closed = file, hashlib.sha256(), False

    def read(self, size=-1):
        data = self.file.read(size)
        self.digest.update(data)
        return data

    def readable(self):
        return True

    def close(self):
        self.closed = True


def usable_frames_of(columns: dict, fps: float, ratio: int = 4) -> np.ndarray:
    """`buckets.usable_frames` of every row at once (the same float operations in the same order)."""
    frames = np.nan_to_num(columns["frames"].astype(np.float64), nan=1.0)
    source_fps = columns["fps"].astype(np.float64)
    start, end = columns["start"].astype(np.float64), columns["end"].astype(np.float64)
    cut = ~np.isnan(start) | ~np.isnan(end)
    with np.errstate(invalid="ignore", divide="ignore"):
        first = np.where(np.isnan(start), 0.0, start) * source_fps
        last = np.where(np.isnan(end), frames, np.minimum(frames, end * source_fps))
        frames = np.where(cut, np.maximum(0.0, np.trunc(last - first)), frames)
        step = np.maximum(1.0, source_fps / fps)
        available = np.ceil(frames / step - 1e-9)
    out = np.where(available < 1, 0, 1 + ratio * ((np.nan_to_num(available, nan=1.0).astype(np.int64) - 1) // ratio))
    still = columns["is_image"] | (np.nan_to_num(columns["frames"].astype(np.float64), nan=1.0) <= 1)
    return np.where(still, 1, out)


def assign_buckets(columns: dict, buckets: Sequence[Bucket], fps: float) -> np.ndarray:
    """The bucket number (position in `buckets`) of every row, -1 where none fits."""
    frames = usable_frames_of(columns, fps).astype(np.int64)
    height, width = columns["height"].astype(np.int64), columns["width"].astype(np.int64)
    if frames.size and max(frames.max(), height.max(), width.max()) >= 1 << 21:
        raise ConfigError("--manifest", None, "a clip is over 2 million frames or pixels on a side; fix its line")
    keys = (frames << 42) | (height << 21) | width  # one integer per (frames, height, width)
    distinct, inverse = np.unique(keys, return_inverse=True)
    mask = (1 << 21) - 1
    number = {bucket: i for i, bucket in enumerate(buckets)}
    chosen = np.array([number.get(bucket_for(int(k >> 42), int((k >> 21) & mask), int(k & mask), buckets), -1)
                       for k in distinct], dtype=np.int64)
    return chosen[inverse.reshape(-1)] if len(distinct) else np.zeros(0, np.int64)


def unusable_reasons(table, columns: dict) -> np.ndarray:
    """Why each row of a manifest block cannot be planned (None where it can): no path, no caption, no size, a
    video without a frame rate. (A line that fits no bucket is found after the bucket rule.) Text columns are
    tested in Arrow, without a Python string per row."""
    import pyarrow.compute as pc

    def blank(name):
        if name not in table.column_names:
            return np.ones(table.num_rows, dtype=bool)
        text = table.column(name)
        return pc.fill_null(pc.equal(pc.utf8_length(text), 0), True).to_numpy(zero_copy_only=False)

    reasons = np.full(table.num_rows, None, dtype=object)
    video = ~columns["is_image"] & (np.nan_to_num(columns["frames"], nan=1.0) > 1)
    for mask, reason in reversed([
            (blank("path"), "it has no path"),
            (blank("caption"), "the manifest line has no caption"),
            (~(np.nan_to_num(columns["height"]) > 0) | ~(np.nan_to_num(columns["width"]) > 0),
             "it has no height and width (write the manifest with `cogvx data scan`)"),
            (video & ~(np.nan_to_num(columns["fps"]) > 0), "it is a video without a frame rate (fps)")]):
        reasons[mask] = reason  # the first reason in the list wins
    return reasons


def numeric_columns(table) -> dict:
    """The numeric columns the bucket rule reads, as float64 arrays (NaN where absent), and `is_image`."""
    import pyarrow.compute as pc

    columns = {}
    for name in ("fps", "frames", "width", "height", "start", "end"):
        if name in table.column_names:
            columns[name] = pc.cast(table.column(name), "float64").to_numpy(zero_copy_only=False)
        else:
            columns[name] = np.full(table.num_rows, np.nan)
    kind = table.column("kind") if "kind" in table.column_names else None
    columns["is_image"] = (np.zeros(table.num_rows, dtype=bool) if kind is None else
                           pc.fill_null(pc.equal(kind, "image"), False).to_numpy(zero_copy_only=False))
    return columns


class ClipIndex:
    """An index folder (see the module docstring): `clip_counts()`, `records(bucket)` (a lazy sequence of the
    bucket's manifest lines as dicts), `merged`, `fingerprint`, `skipped`."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta
        self.buckets: list[str] = meta["buckets"]
        self.merged: dict[str, dict[str, int]] = meta.get("merged") or {}
        self.fingerprint: str = meta["fingerprint"]
        self.skipped: int = meta["skipped"]
        self.skipped_examples: list[str] = meta.get("skipped_examples", [])
        self._groups: OrderedDict = OrderedDict()  # (file, row group) -> rows, least recently used first
        self._own_starts = {b: np.cumsum([0] + [p["segments"].get(b, [0, 0])[1] for p in meta["parts"]])
                            for b in self.buckets}

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "ClipIndex":
        folder = Path(folder)
        try:
            meta = json.loads((folder / INDEX_FILE).read_text())
        except FileNotFoundError:
            raise ConfigError("--data", str(folder), f"no clip index there (no {INDEX_FILE}); build one with "
                                                     f"`cogvx data index MANIFEST --output {folder}`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError("--data", str(folder / INDEX_FILE), f"is damaged ({error}); build the index "
                                                                  f"again") from None
        if meta.get("format") != INDEX_FORMAT:
            raise ConfigError("--data", str(folder), f"not a {INDEX_FORMAT} index")
        for part in meta["parts"] + ([{"file": MERGED_FILE, "bytes": meta["merged_bytes"]}]
                                     if meta.get("merged_rows") else []):
            file = folder / part["file"]
            size = file.stat().st_size if file.is_file() else None
            if size is None or size != part["bytes"]:
                raise ConfigError("--data", str(file), f"is {'missing' if size is None else 'damaged'} "
                                                       f"({size} bytes, the index lists {part.get('bytes')}); "
                                                       f"build the index again")
        return cls(folder, meta)

    def clip_counts(self) -> dict[str, int]:
        """bucket -> clips, for every bucket of the index (0 included), in the index's bucket order."""
        return dict(self.meta["clips"])

    def __len__(self) -> int:
        return sum(self.meta["clips"].values())

    def records(self, bucket: str) -> "BucketRecords":
        return BucketRecords(self, bucket)

    def _group(self, file: str, group: int) -> list[dict]:
        key = (file, group)
        if key not in self._groups:
            import pyarrow.parquet as pq

            try:
                rows = pq.ParquetFile(self.folder / file).read_row_group(group).to_pylist()
            except Exception as error:  # pyarrow raises several types for a damaged file
                raise ConfigError("--data", str(self.folder / file), f"cannot be read ({error}); build the index "
                                                                     f"again") from None
            for row in rows:
                for name in [k for k, v in row.items() if v is None]:
                    del row[name]  # as the manifest line had it: an absent field, not null
            self._groups[key] = rows
            while len(self._groups) > 16:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key]

    def _rows(self, file: str, start: int, stop: int) -> list[dict]:
        out = []
        for group in range(start // ROW_GROUP_ROWS, (stop - 1) // ROW_GROUP_ROWS + 1):
            rows = self._group(file, group)
            first = group * ROW_GROUP_ROWS
            out.extend(rows[max(start, first) - first:min(stop, first + len(rows)) - first])
        return out

    def rows(self, bucket: str, start: int, stop: int) -> list[dict]:
        """The manifest lines of clips start..stop-1 of `bucket`, as dicts."""
        stop = min(stop, self.meta["clips"][bucket])
        out = []
        starts = self._own_starts[bucket]
        own = int(starts[-1]) if bucket not in self.meta.get("small", []) else 0
        position = start
        while position < min(stop, own):
            part = int(np.searchsorted(starts, position, side="right")) - 1
            offset, count = self.meta["parts"][part]["segments"][bucket]
            take = min(stop, int(starts[part + 1])) - position
            first = offset + position - int(starts[part])
            out.extend(self._rows(self.meta["parts"][part]["file"], first, first + take))
            position += take
        if position < stop:  # the clips merged into it (or, for a small bucket, the ones that stayed)
            offset = self.meta["merged_segments"][bucket][0]
            out.extend(self._rows(MERGED_FILE, offset + position - own, offset + stop - own))
        return out


class BucketRecords(Sequence):
    """The manifest lines of one bucket's clips, read from the index when indexed or sliced."""

    def __init__(self, index: ClipIndex, bucket: str):
        self.index, self.bucket = index, bucket

    def __len__(self) -> int:
        return self.index.meta["clips"][self.bucket]

    def __getitem__(self, item):
        if isinstance(item, slice):
            start, stop, stride = item.indices(len(self))
            rows = self.index.rows(self.bucket, start, stop) if stop > start else []
            return rows[::stride] if stride != 1 else rows
        position = item + len(self) if item < 0 else item
        if not 0 <= position < len(self):
            raise IndexError(item)
        return self.index.rows(self.bucket, position, position + 1)[0]


def _read_blocks(manifest: Path, reader_file, block_bytes: int):
    pa = _pyarrow()
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in KNOWN_COLUMNS.items()])
    stream = pa.json.open_json(reader_file, read_options=pa.json.ReadOptions(block_size=block_bytes),
                               parse_options=pa.json.ParseOptions(explicit_schema=schema,
                                                                  unexpected_field_behavior="infer"))
    for batch in stream:
        yield pa.Table.from_batches([batch])


def _explain_bad_manifest(manifest: Path, error: Exception) -> ConfigError:
    """pyarrow's parse errors name no line: find the first bad line the way `manifest.read_manifest` says it."""
    with open(manifest, "rb") as file:
        for number, raw in enumerate(file, 1):
            if not raw.strip():
                continue
            try:
                item = parse_manifest_line(raw, number, manifest)
            except ConfigError as bad:
                return bad
            for name, kind in KNOWN_COLUMNS.items():
                value = item.get(name)
                wrong = value is not None and (isinstance(value, bool) or (
                    not isinstance(value, str) if kind == "string" else not isinstance(value, (int, float))
                    if kind == "float64" else not isinstance(value, int)))
                if wrong:
                    return ConfigError("--manifest", str(manifest), f"line {number}: {name}={value!r} is not "
                                                                    f"a{' text' if kind == 'string' else ' number'}")
    return ConfigError("--manifest", str(manifest), f"cannot be read as JSON lines ({error})")


def build_index(manifest: str | os.PathLike, folder: str | os.PathLike, bucket_names: Sequence[str], fps: float,
                merge_below: Optional[int] = None, block_bytes: int = BLOCK_BYTES,
                progress: bool = False, filters: Optional[list] = None,
                captions: Optional[list] = None) -> ClipIndex:
    """Index `manifest` into `folder` (written whole or not at all) for `bucket_names` at `fps`; with
    `merge_below` (the global batch, data.small_buckets=merge) the clips of buckets holding fewer move as
    `buckets.merge_small_buckets` moves them; with `filters` (data.filters) only the lines whose columns lie in
    bounds are kept, and the lines each filter drops are counted. `manifest` may also be an index folder built
    without filters: its rows are read back (in manifest order within each bucket) and indexed again, which is
    how a stage's filters are applied to an index built once. `captions` (data.captions): the columns a caption
    may come from; the index's `caption` column holds the first of them each line has (the original text of
    `caption` is kept as `manifest_caption` where it differs), so every reader sees the chosen caption."""
    pa = _pyarrow()
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    manifest = Path(manifest)
    source_index = ClipIndex.open(manifest) if (manifest / INDEX_FILE).is_file() else None
    if source_index is None and not manifest.is_file():
        raise ConfigError("--manifest", str(manifest), "no such file; write one with `cogvx data scan DIR --output M`")
    if source_index is not None and (source_index.meta.get("filters") or source_index.meta.get("captions")):
        raise ConfigError("--data", str(manifest), "this index was built with data.filters or data.captions, so it "
                                                   "lacks what they dropped or replaced: build it from the manifest "
                                                   "without them, and set them per run or stage")
    buckets = [Bucket.parse(name) for name in bucket_names]
    names = [b.name for b in buckets]
    filters = list(filters or [])
    parts, skipped, examples, line, kinds = [], 0, [], 0, {}
    dropped, seen_columns, all_columns = [0] * len(filters), set(), set()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(p["rows"] for p in source_index.meta["parts"]) if source_index else manifest.stat().st_size
        bar = tqdm(total=total, unit="row" if source_index else "B", unit_scale=True, desc="index",
                   dynamic_ncols=True)
    with atomic_directory(folder) as tmp, contextlib.ExitStack() as stack:
        if source_index is None:
            raw = stack.enter_context(open(manifest, "rb"))
            hashed = _HashingReader(raw)
            blocks = _read_blocks(manifest, hashed, block_bytes)
        else:
            blocks = (pa.Table.from_batches([batch]) for part in source_index.meta["parts"]
                      for batch in pq.ParquetFile(manifest / part["file"]).iter_batches(batch_size=1 << 16))
        try:
            for table in blocks:
                if captions and list(captions) != ["caption"]:
                    table = choose_captions(table, captions)
                columns = numeric_columns(table)
                all_columns.update(table.column_names)
                if "kind" in table.column_names:
                    for item in pc.value_counts(table.column("kind")).to_pylist():
                        kinds[item["values"] or "video"] = kinds.get(item["values"] or "video", 0) + item["counts"]
                reasons = unusable_reasons(table, columns)
                ok = reasons == None  # noqa: E711 (elementwise)
                for number, passes in enumerate(filter_passes(table, filters, seen_columns)):
                    dropped[number] += int((ok & ~passes).sum())
                    ok &= passes
                kept_by_filters = ok | (reasons != None)  # noqa: E711 (elementwise)
                number = np.full(table.num_rows, -1, np.int64)
                if ok.any():
                    number[ok] = assign_buckets({k: v[ok] for k, v in columns.items()}, buckets, fps)
                for row in np.flatnonzero((number < 0) & kept_by_filters):
                    skipped += 1
                    if len(examples) < SKIPPED_SHOWN:
                        reason = reasons[row] or f"fits no bucket of {', '.join(names)}"
                        path = table.column("path")[int(row)].as_py() if "path" in table.column_names else None
                        where = path or f"manifest row {line + row + 1}"
                        examples.append(f"skipped {where}: {reason}")
                keep = np.flatnonzero(number >= 0)
                order = keep[np.argsort(number[keep], kind="stable")]
                if order.size:
                    part = f"part-{len(parts):05d}.parquet"
                    block = table.take(pa.array(order))
                    pq.write_table(block, tmp / part, row_group_size=ROW_GROUP_ROWS, compression="zstd")
                    sorted_numbers = number[order]
                    segments = {}
                    for i, name in enumerate(names):
                        lo, hi = np.searchsorted(sorted_numbers, [i, i + 1])
                        if hi > lo:
                            segments[name] = [int(lo), int(hi - lo)]
                    parts.append({"file": part, "rows": int(order.size), "segments": segments,
                                  "bytes": (tmp / part).stat().st_size})
                line += table.num_rows
                if bar is not None:
                    bar.update(table.num_rows if source_index else raw.tell() - bar.n)
        except pa.ArrowInvalid as error:
            raise _explain_bad_manifest(manifest, error) from None
        if bar is not None:
            bar.close()
        for number, item in enumerate(filters):
            if item["column"] not in seen_columns:
                raise ConfigError(f"data.filters[{number}].column", item["column"],
                                  f"no line of {manifest} has that column; its columns are "
                                  f"{', '.join(sorted(all_columns))}")
        meta = {"format": INDEX_FORMAT, "manifest": str(manifest.resolve()), "buckets": names, "fps": fps,
                "merge_below": merge_below, "parts": parts, "skipped": skipped, "skipped_examples": examples,
                "lines": line, "kinds": kinds, "filters": filters or None, "captions": list(captions or []) or None,
                "filter_dropped": dropped}
        counts = {name: sum(p["segments"].get(name, [0, 0])[1] for p in parts) for name in names}
        merged: dict[str, dict[str, int]] = {}
        small = [name for name in names if 0 < counts[name] < merge_below] if merge_below else []
        if small:
            meta["small"] = small
            merged, counts = _merge(tmp, meta, buckets, counts, fps, merge_below)
        meta["merged"], meta["clips"] = merged, counts
        made_from = {"manifest": hashed.digest.hexdigest() if source_index is None else source_index.fingerprint,
                     "buckets": names, "fps": fps}
        if merged:
            made_from["merged"] = merged
        if filters:
            made_from["filters"] = filters
        if captions and list(captions) != ["caption"]:
            made_from["captions"] = list(captions)
        meta["fingerprint"] = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()
        (tmp / INDEX_FILE).write_text(json.dumps(meta, indent=1))
    return ClipIndex.open(folder)


def choose_captions(table, columns: Sequence[str]):
    """`table` with `caption` = the first of `columns` each row holds as non-empty text (null where none: the row is
    then left out as one without a caption); the original `caption`, where there was one, as `manifest_caption`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def text(name):
        if name not in table.column_names or not pa.types.is_string(table.column(name).type):
            return pa.nulls(table.num_rows, pa.string())
        values = table.column(name)
        return pc.if_else(pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0), False),
                          values, pa.scalar(None, pa.string()))

    chosen = pc.coalesce(*[text(name) for name in columns])
    if "caption" in table.column_names:
        table = table.append_column("manifest_caption", table.column("caption"))
        table = table.set_column(table.column_names.index("caption"), "caption", chosen)
    else:
        table = table.append_column("caption", chosen)
    return table


def filter_passes(table, filters: list, seen_columns: set) -> list[np.ndarray]:
    """For each filter {column, min, max}, whether each row of a manifest block passes it (a row without a value
    does not); the filtered columns present in the block are added to `seen_columns`. A column that holds text
    is one ConfigError."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = []
    for number, item in enumerate(filters):
        column = item["column"]
        if column not in table.column_names:
            out.append(np.zeros(table.num_rows, dtype=bool))
            continue
        values = table.column(column)
        if pa.types.is_null(values.type):
            out.append(np.zeros(table.num_rows, dtype=bool))
            continue
        seen_columns.add(column)
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)
                or pa.types.is_boolean(values.type)):
            raise ConfigError(f"data.filters[{number}].column", column, f"holds {values.type} values, not numbers: "
                                                                        f"filter a numeric column")
        numbers = pc.cast(values, "float64").to_numpy(zero_copy_only=False)
        passes = ~np.isnan(numbers)
        if item.get("min") is not None:
            passes &= numbers >= item["min"]
        if item.get("max") is not None:
            passes &= numbers <= item["max"]
        out.append(passes)
    return out


def filter_summary(index: "ClipIndex") -> Optional[str]:
    """One line per filter of the index: the lines it dropped, then the clips kept; None without filters."""
    filters = index.meta.get("filters")
    if not filters:
        return None
    lines = []
    for item, dropped in zip(filters, index.meta["filter_dropped"]):
        bounds = " and ".join(part for part in (
            f">= {item['min']}" if item.get("min") is not None else "",
            f"<= {item['max']}" if item.get("max") is not None else "") if part)
        lines.append(f"  filter {item['column']} {bounds}: {dropped} clips dropped")
    lines.append(f"  kept {len(index)} clips of {index.meta['lines']} manifest lines")
    return "data.filters:\n" + "\n".join(lines)


def _merge(tmp: Path, meta: dict, buckets: list[Bucket], counts: dict[str, int], fps: float,
           global_batch: int) -> tuple[dict, dict]:
    """data.small_buckets=merge: the small buckets' rows (few: each holds fewer than a global batch) are read,
    moved by `buckets.merge_targets`, and written to `merged.parquet` grouped by the bucket they end in: there a
    target's moved clips (after its own) and a small bucket's clips that stayed."""
    pa = _pyarrow()
    import pyarrow.parquet as pq

    index = ClipIndex(tmp, {**meta, "clips": counts, "fingerprint": "", "merged": {}, "small": []})
    small = {Bucket.parse(name): index.rows(name, 0, counts[name]) for name in meta["small"]}
    moves = merge_targets({Bucket.parse(n): c for n, c in counts.items()}, small, fps, global_batch)
    ending: dict[str, list[dict]] = {b.name: [] for b in buckets}
    merged: dict[str, dict[str, int]] = {}
    for source, pairs in moves.items():
        for record, target in pairs:
            ending[(target or source).name].append(record)
            if target is not None:
                into = merged.setdefault(source.name, {})
                into[target.name] = into.get(target.name, 0) + 1
    rows, segments = [], {}
    for name, records in ending.items():
        if records:
            segments[name] = [len(rows), len(records)]
            rows.extend(records)
    pq.write_table(pa.Table.from_pylist(rows), tmp / MERGED_FILE, row_group_size=ROW_GROUP_ROWS, compression="zstd")
    meta["merged_rows"], meta["merged_segments"] = len(rows), segments
    meta["merged_bytes"] = (tmp / MERGED_FILE).stat().st_size
    new_counts = {name: (0 if name in meta["small"] else counts[name]) + len(ending[name]) for name in counts}
    return merged, new_counts


def index_for(source: str | os.PathLike, bucket_names: Sequence[str], fps: float,
              merge_below: Optional[int] = None, flag: str = "--data", filters: Optional[list] = None,
              captions: Optional[list] = None) -> ClipIndex:
    """The clip index of `source`: an index folder (checked to be built for these buckets, rate and merge; with
    other `filters` than it was built with, indexed again with them into a temporary folder), or a JSONL
    manifest indexed into a temporary folder removed when the process ends."""
    where = Path(source)
    if where.is_dir() and (where / INDEX_FILE).is_file():
        index = ClipIndex.open(where)
        wanted = {"buckets": [Bucket.parse(n).name for n in bucket_names], "fps": fps, "merge_below": merge_below}
        built = {name: index.meta.get(name) for name in wanted}
        if built != wanted:
            raise ConfigError(flag, str(source), f"the index was built for {built}, this run needs {wanted}; build "
                                                 f"it again with `cogvx data index` and this config")
        if ((index.meta.get("filters") or None) == (list(filters or []) or None)
                and (index.meta.get("captions") or ["caption"]) == list(captions or ["caption"])):
            return index
    import atexit

    tmp = Path(tempfile.mkdtemp(prefix="cogvx-index-"))
    atexit.register(shutil.rmtree, tmp, True)
    return build_index(where, tmp / "index", bucket_names, fps, merge_below, filters=filters, captions=captions)


def skipped_lines(index: ClipIndex) -> list[str]:
    """The 'skipped PATH: reason' lines of the manifest lines the index left out (the first SKIPPED_SHOWN, then
    a count of the rest)."""
    lines = list(index.skipped_examples)
    if index.skipped > len(lines):
        lines.append(f"skipped {index.skipped - len(lines)} more lines (the first {len(lines)} are shown)")
    return lines


def index_bytes(folder: str | os.PathLike) -> int:
    """Bytes on disk of an index folder."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())

