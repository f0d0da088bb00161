"""`cogvx data scan DIR --output manifest.jsonl`: probe every media file under a folder and write the usable clips
as a manifest (`cogvx_mega.data.manifest`); a file that cannot be read is skipped and reported, never fatal."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cogvx_mega.config.errors import ConfigError, refuse_existing_output
from cogvx_mega.data.manifest import find_media, read_captions, scan, write_manifest


@dataclass
class ScanSummary:
    files: int
    clips: int
    videos: int
    skipped: int


def scan_folder(source: str, output: str, captions: Optional[str] = None, workers: int = 1,
                overwrite: bool = False) -> ScanSummary:
    """Scan `source` into the manifest `output`; every skipped file is one line on stderr. Checked before
    anything is written: the folder exists, the output does not (without `overwrite`) and can be written,
    some file is usable."""
    root = Path(source)
    if not root.is_dir():
        raise ConfigError("DIR", source, "no such folder; pass the folder that holds the videos and images")
    refuse_existing_output("--output", output, overwrite)
    caption_of = read_captions(captions, root) if captions else {}
    paths = find_media(root)
    records, failures = scan(paths, caption_of, workers=workers)
    for failure in failures:
        print(f"skipped {failure.path}: {failure.reason}", file=sys.stderr)
    if not records:
        raise ConfigError("DIR", source, f"none of its {len(paths)} media files is usable (see the lines above); "
                                         f"nothing written")
    write_manifest(records, output)
    videos = sum(record.kind == "video" for record in records)
    return ScanSummary(files=len(paths), clips=len(records), videos=videos, skipped=len(failures))
