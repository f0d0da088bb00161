"""The marker file a command leaves in each folder it writes whole (`cogvx convert`'s cogvx_convert.json,
`cogvx export`'s cogvx_export.json), and the check that lets `--overwrite` replace only such a folder.

`--overwrite` exists to redo a conversion or an export; a mistyped output path must never delete anything else.
So an existing folder is replaced only when it holds the marker of the same command (of the same kind where the
command has kinds) or holds nothing; anything else is refused with one line, and nothing is deleted. The marker
also tells a reader of the folder which tool wrote it, from what and when.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Iterator, Optional

from cogvx_mega.checkpoint.atomic import atomic_directory
from cogvx_mega.config.errors import ConfigError, refuse_existing_output


@dataclasses.dataclass(frozen=True)
class OutputMarker:
    """What marks the folders one command writes."""
    file_name: str
    """The marker's file in the folder, e.g. cogvx_convert.json."""
    format: str
    """The tag in the file; a file of that name with another tag was not written by us and marks nothing."""
    noun: str
    """What such a folder is called in messages: "conversion", "export"."""
    command: str
    """The command that writes such folders, for messages: "cogvx convert"."""


CONVERSION = OutputMarker("cogvx_convert.json", "cogvx-mega/convert-v1", "conversion", "cogvx convert")


def conversion_record(direction: str, source: str) -> dict:
    """What a conversion's marker says besides the tool and the time: the direction (its kind), the part
    converted, the formats on either side and the source (absolute path)."""
    part = "vae" if direction.startswith("vae-") else "transformer"
    source_format, _, destination_format = direction.removeprefix("vae-").partition("-to-")
    return {"kind": direction, "command": f"cogvx convert {direction}", "part": part, "from": source_format,
            "to": destination_format, "source": str(Path(source).resolve())}


def tool_version() -> str:
    """The installed cogvx-mega version ("unknown" when run from a checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cogvx-mega")
    except PackageNotFoundError:
        return "unknown"


def marker_record(marker: OutputMarker, **fields) -> dict:
    """What the marker file holds: its format, the tool and its version, the command's own `fields` (kind,
    source, ...) and the UTC time of writing."""
    return {"format": marker.format, "tool": "cogvx-mega", "version": tool_version(), **fields,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_marker(folder: str | os.PathLike, marker: OutputMarker, **fields) -> None:
    (Path(folder) / marker.file_name).write_text(json.dumps(marker_record(marker, **fields), indent=2) + "\n")


def read_marker(folder: str | os.PathLike, marker: OutputMarker) -> Optional[dict]:
    """The marker in `folder`; None when there is none, or its file is not one of ours."""
    try:
        record = json.loads((Path(folder) / marker.file_name).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == marker.format else None


@contextlib.contextmanager
def marked_directory(path: str | os.PathLike, marker: OutputMarker, **fields) -> Iterator[Path]:
    """Yield a folder to write the output in; when the block ends without an error it gets the marker and
    replaces `path` in one rename (`checkpoint.atomic`), so no reader sees the output without its marker. A
    writer that makes its folder atomically itself may be given the yielded path: it replaces that empty folder
    with its own in one more rename beside it."""
    with atomic_directory(path) as staging:
        yield staging
        write_marker(staging, marker, **fields)


def refuse_unsafe_replacement(flag: str, path, overwrite: bool, marker: OutputMarker,
                              kind: Optional[str] = None) -> None:
    """The check before a command writes the folder `path` whole: an existing path is refused without
    --overwrite; with it, only a folder holding `marker` (with this `kind` when one is given) or an empty folder
    may be replaced. The folder that will hold `path` must take new files (`refuse_existing_output`). Every
    fault is one ConfigError, and nothing is deleted or written."""
    keep = f"remove it yourself or choose another {flag} (nothing was deleted)"
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(flag, str(path), f"is a file, not a previous {marker.noun}; --overwrite replaces only a "
                                           f"folder `{marker.command}` wrote: {keep}")
    refuse_existing_output(flag, path, overwrite, what="folder")
    if not folder.exists():
        return
    try:
        empty = not any(folder.iterdir())
    except OSError as error:
        raise ConfigError(flag, str(path), f"cannot be listed ({error.strerror}); {keep}") from None
    if empty:
        return
    record = read_marker(folder, marker)
    if record is None:
        raise ConfigError(flag, str(path), f"holds no {marker.file_name}, so it is not a previous {marker.noun} (or "
                                           f"one written before {marker.noun}s were marked); --overwrite replaces "
                                           f"only those: {keep}")
    if kind is not None and record.get("kind") != kind:
        raise ConfigError(flag, str(path), f"holds a previous {record.get('kind')} {marker.noun}, not a {kind} one; "
                                           f"--overwrite replaces only one of the same kind: {keep}")
