"""`cogvx data dedup MANIFEST --output OUT`: the manifest without its exact and near-duplicate clips
(`cogvx_mega.data.dedup`: perceptual hashes of a few frames per clip, one clip kept per group).

Written: OUT (the manifest lines kept, in manifest order), OUT.duplicates.jsonl (one line per group: the clip
kept, the clips dropped with their distance to it) and OUT.hashes.jsonl (every clip's signature, appended as it is
computed: a killed run, or a run again at another threshold, reads it and hashes only what is missing). A clip
that cannot be read is one line on stderr, counted, and kept in OUT (it is compared with nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

HELP = "drop exact and near-duplicate clips of a manifest (perceptual hashes of a few frames per clip)"


@dataclass
class DedupSummary:
    clips: int
    hashed: int
    """Signatures computed by this run."""
    reused: int
    """Signatures read from OUT.hashes.jsonl."""
    unreadable: int
    groups: int
    exact: int
    """Clips dropped as byte-identical copies of a kept clip."""
    near: int
    kept: int
    compared: int
    skipped_buckets: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cogvx_mega.data.dedup import DEFAULT_FRAMES, DEFAULT_THRESHOLD

    parser.add_argument("manifest", metavar="MANIFEST")
    parser.add_argument("--output", required=True,
                        help="the manifest to write without the duplicates; beside it OUTPUT.duplicates.jsonl (the "
                             "groups) and OUTPUT.hashes.jsonl (the signatures: a run again reuses them)")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                        help="frames hashed per clip, spread over its start..end")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="near-duplicates: mean Hamming distance of the frames' 64-bit pHashes at most this")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="clips hashed in parallel")
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    summary = dedup_manifest(args.manifest, args.output, frames=args.frames, threshold=args.threshold,
                             workers=args.workers, overwrite=args.overwrite)
    print(summary_table(f"dedup of {args.manifest}", [
        ("clips", summary.clips, ""),
        ("hashed", summary.hashed, ""),
        ("reused", summary.reused, f"signatures from {args.output}.hashes.jsonl"),
        ("unreadable", summary.unreadable, "kept, compared with nothing (the lines above)" if summary.unreadable
         else ""),
        ("groups", summary.groups, f"listed in {args.output}.duplicates.jsonl" if summary.groups else ""),
        ("dropped, exact", summary.exact, "the same bytes"),
        ("dropped, near", summary.near, f"mean distance <= {args.threshold:g} of 64 bits"),
        ("kept", summary.kept, f"written to {args.output}"),
    ]))
    return 0


def summary_table(title: str, rows: Sequence[tuple[str, object, str]]) -> str:
    """A command's closing summary: the title, then one `name  value  note` row each, values right-aligned."""
    names = max(len(name) for name, _, _ in rows)
    values = max(len(f"{value:,}" if isinstance(value, int) else str(value)) for _, value, _ in rows)
    lines = [title]
    for name, value, note in rows:
        text = f"{value:,}" if isinstance(value, int) else str(value)
        lines.append(f"  {name.ljust(names)}  {text.rjust(values)}  {note}".rstrip())
    return "\n".join(lines)


def write_lines_atomically(path: str, lines) -> None:
    """Stream `lines` into a hidden sibling of `path`, renamed into place when whole (a manifest of millions of
    lines is never one string)."""
    from cogvx_mega.checkpoint.atomic import hidden_sibling

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_sibling(target, ".tmp-")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.writelines(lines)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def dedup_manifest(manifest: str, output: str, frames: int = 4, threshold: float = 8.0, workers: int = 8,
                   overwrite: bool = False, progress: bool = True) -> DedupSummary:
    """Write OUTPUT, OUTPUT.duplicates.jsonl and (appending) OUTPUT.hashes.jsonl; see the module. Checked before
    any clip is read: the manifest, the output (refused if it exists, without `overwrite`), the flags."""
    from concurrent.futures import ThreadPoolExecutor

    from cogvx_mega.checkpoint.atomic import write_text_atomically
    from cogvx_mega.config.errors import ConfigError, refuse_existing_output
    from cogvx_mega.data.dedup import HashCache, find_groups, hash_clip
    from cogvx_mega.data.decode import media_name
    from cogvx_mega.data.manifest import read_clip_lines

    if frames < 1:
        raise ConfigError("--frames", frames, "hash at least 1 frame per clip")
    if not 0 <= threshold <= 64:
        raise ConfigError("--threshold", threshold, "a mean Hamming distance between 0 and 64 bits")
    if os.path.abspath(manifest) == os.path.abspath(output):
        raise ConfigError("--output", output, "is the manifest read; write the deduplicated one to another file")
    refuse_existing_output("--output", output, overwrite)
    records = read_clip_lines(manifest)
    cache = HashCache(Path(f"{output}.hashes.jsonl"))
    reused = hashed = 0

    def one(record: dict):
        entry = cache.lookup(record, frames)
        if entry is not None:
            return entry, True
        try:
            entry = hash_clip(record, frames)
        except OSError as error:  # not cached: it may be readable next time
            return {"error": f"cannot be read ({error.strerror or error})"}, False
        cache.add(entry)
        return entry, False

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), desc="dedup", unit="clip", dynamic_ncols=True)
    entries: list[Optional[dict]] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PyAV and Pillow decode without the GIL
            for entry, from_cache in pool.map(one, records):
                entries.append(entry)
                reused += from_cache
                hashed += not from_cache and "hashes" in entry
                if bar is not None:
                    bar.update(1)
    finally:
        cache.close()
        if bar is not None:
            bar.close()
    unreadable = 0
    for record, entry in zip(records, entries):
        if "error" in entry:
            unreadable += 1
            print(f"unreadable {media_name(record)}: {entry['error']} (kept, compared with nothing)", file=sys.stderr)
    groups, stats = find_groups(records, entries, threshold)
    dropped = {duplicate.line for group in groups for duplicate in group.dropped}

    def clip(line: int, **more) -> dict:
        record = records[line]
        return {"line": line + 1, "path": record["path"],
                **{k: record[k] for k in ("member", "start", "end") if record.get(k) is not None}, **more}

    report = "".join(json.dumps({"kept": clip(group.kept), "dropped": [
        clip(d.line, exact=d.exact, distance=d.distance) for d in group.dropped]}) + "\n" for group in groups)
    write_text_atomically(f"{output}.duplicates.jsonl", report)
    write_lines_atomically(output, (json.dumps(record) + "\n" for line, record in enumerate(records)
                                    if line not in dropped))
    return DedupSummary(clips=len(records), hashed=hashed, reused=reused, unreadable=unreadable, groups=len(groups),
                        exact=stats.exact, near=stats.near, kept=len(records) - len(dropped),
                        compared=stats.compared, skipped_buckets=stats.skipped_buckets)
