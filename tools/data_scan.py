"""`cogvx data scan DIR --output manifest.jsonl`: probe every media file under a folder and write the usable clips
as a manifest (`cogvx_mega.data.manifest`); a file that cannot be read is skipped and reported, never fatal."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cogvx_mega.config.errors import ConfigError, refuse_existing_output
from cogvx_mega.checkpoint.atomic import write_text_atomically
from cogvx_mega.data.manifest import find_media, merge_manifests, read_captions, scan, write_manifest


@dataclass
class ScanSummary:
    files: int
    clips: int
    videos: int
    skipped: int
    merged: bool = True
    """False for a part of a parallel scan whose merge another task does."""


def scan_folder(source: str, output: str, captions: Optional[str] = None, workers: int = 1,
                overwrite: bool = False, part: Optional[tuple[int, int]] = None) -> ScanSummary:
    """Scan `source` into the manifest `output`; every skipped file is one line on stderr. Checked before
    anything is written: the folder exists, the output does not (without `overwrite`) and can be written,
    some file is usable.

    `part` (i, n), or the task's place under torchrun (RANK of WORLD_SIZE) or in a SLURM job array: this task
    probes its share of the files (`manifest.find_media`) and writes `OUTPUT.parts/part-i-of-n.jsonl`; the task
    that finds all n parts written merges them into OUTPUT in path order (`manifest.merge_manifests`: the
    manifest one scan would write) and removes the parts. A task run again finds its part written and does not
    scan again (delete OUTPUT.parts to start over). The summary is of the whole scan once merged, of this part
    otherwise (`ScanSummary.merged`)."""
    root = Path(source)
    if not root.is_dir():
        raise ConfigError("DIR", source, "no such folder; pass the folder that holds the videos and images")
    refuse_existing_output("--output", output, overwrite)
    index, count = part or task_part()
    if not 0 <= index < count:
        raise ConfigError("--part", f"{index}/{count}", "write I/N with 0 <= I < N")
    folder, name = parts_folder(output), part_name(index, count)
    if count > 1 and (folder / f"{name}.json").is_file():  # written by an earlier run of this task: resumed
        summary = ScanSummary(**json.loads((folder / f"{name}.json").read_text()))
        return merge_when_complete(source, output, count) or dataclasses.replace(summary, merged=False)
    caption_of = read_captions(captions, root) if captions else {}
    paths = find_media(root, index, count)
    records, failures = scan(paths, caption_of, workers=workers, progress=count == 1)
    for failure in failures:
        print(f"skipped {failure.path}: {failure.reason}", file=sys.stderr)
    records.sort(key=lambda record: record.path)
    summary = ScanSummary(files=len(paths), clips=len(records), videos=sum(r.kind == "video" for r in records),
                          skipped=len(failures))
    if count == 1:
        if not records:
            raise ConfigError("DIR", source, f"none of its {len(paths)} media files is usable (see the lines above); "
                                             f"nothing written")
        write_manifest(records, output)
        return summary
    write_manifest(records, folder / f"{name}.jsonl")
    write_text_atomically(folder / f"{name}.json", json.dumps(dataclasses.asdict(summary)))
    return merge_when_complete(source, output, count) or dataclasses.replace(summary, merged=False)


def task_part() -> tuple[int, int]:
    """(this task's part, parts) under torchrun or a SLURM job array; (0, 1) alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1")) > 1:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def parse_part(text: Optional[str]) -> Optional[tuple[int, int]]:
    """--part I/N as (I, N); None without the flag (every command split over tasks takes it)."""
    if text is None:
        return None
    try:
        part = tuple(int(v) for v in text.split("/"))
    except ValueError:
        part = ()
    if len(part) != 2:
        raise ConfigError("--part", text, "write I/N, e.g. 3/16 for the fourth of 16 parts")
    return part


def parts_folder(output: str) -> Path:
    return Path(f"{output}.parts")


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def claim_complete_parts(folder: Path, count: int) -> Optional[list[dict]]:
    """The summaries of the n parts in `folder` (`part-i-of-n.json`) when all are written and this task is the
    first to claim their merge (a claim file created exclusively decides); None when a part is missing or another
    task has the merge. One part alone merges without a claim (a claim left by its own killed merge is no
    obstacle). Every command split over tasks (scan, split, score, caption) merges this way."""
    names = [part_name(i, count) for i in range(count)]
    if not all((folder / f"{name}.json").is_file() for name in names):
        return None
    if count > 1:
        try:
            os.close(os.open(folder / f"merging-of-{count:05d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return None
    return [json.loads((folder / f"{name}.json").read_text()) for name in names]


def merge_when_complete(source: str, output: str, count: int) -> Optional[ScanSummary]:
    """Merge the n parts into `output` when all are written and no other task has begun to (a claim file
    created exclusively decides); the whole scan's summary, or None when this task leaves the merge to another."""
    folder = parts_folder(output)
    totals = claim_complete_parts(folder, count)
    if totals is None:
        return None
    names = [part_name(i, count) for i in range(count)]
    summary = ScanSummary(**{field: sum(t[field] for t in totals) for field in ("files", "clips", "videos", "skipped")})
    summary.merged = True
    if not summary.clips:
        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError("DIR", source, f"none of its {summary.files} media files is usable (see the lines above); "
                                         f"nothing written")
    merge_manifests([folder / f"{name}.jsonl" for name in names], Path(output))
    shutil.rmtree(folder, ignore_errors=True)
    return summary
