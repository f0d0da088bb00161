"""The error every user mistake in a config or a command line becomes, and the checks several sections share.

A `ConfigError` names the field (or flag), the bad value and the fix; the CLI prints it as one line and exits 2.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Literal


class ConfigError(ValueError):
    """A configuration value a user can fix. Its message names the field and the fix."""

    def __init__(self, field_name: str, value, fix: str):
        self.field_name = field_name
        self.value = value
        self.fix = fix
        super().__init__(f"{field_name}={value!r}: {fix}")


def choices_of(annotation) -> tuple:
    """The allowed values of a `Literal[...]` field annotation (also inside Optional[...]); () for any other."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return next((choices_of(arg) for arg in typing.get_args(annotation) if choices_of(arg)), ())


def check_choices(section, section_name: str) -> None:
    """Every `Literal[...]` field of a config section holds one of its values (None where Optional)."""
    hints = typing.get_type_hints(type(section))
    for field in dataclasses.fields(section):
        choices = choices_of(hints[field.name])
        value = getattr(section, field.name)
        if not choices or value in choices or (value is None and type(None) in typing.get_args(hints[field.name])):
            continue
        nullable = ", or null" if type(None) in typing.get_args(hints[field.name]) else ""
        raise ConfigError(f"{section_name}.{field.name}", value, f"choose one of {', '.join(map(str, choices))}"
                                                                 f"{nullable}")


def require_positive_integers(section, section_name: str, names) -> None:
    for name in names:
        value = getattr(section, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{section_name}.{name}", value, "must be a positive integer")


def check_hang_timeout(field_name: str, value) -> None:
    """A hang watchdog's timeout (`training.hang_timeout_s`, `vae_train.hang_timeout_s`): seconds, or 0 / None
    for none."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
        raise ConfigError(field_name, value, "use seconds above the slowest step (e.g. 600), or 0 / null for no "
                                             "watchdog")


def check_frame_count(field_name: str, frames, temporal_compression_ratio: int) -> None:
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % temporal_compression_ratio:
        raise ConfigError(field_name, frames,
                          f"frame counts must be 1+{temporal_compression_ratio}k (1, 5, 9, ..., 49)")


def refuse_existing_output(flag: str, path, overwrite: bool, what: Literal["file", "folder"] = "file") -> None:
    """The one check before a command spends time on an output that replaces `path` whole (a file, or with
    what="folder" a folder built beside it and renamed into place): a path of the other kind is refused, an
    existing one too unless --overwrite, and the folder it goes in must take new files (`probe_writable`).
    Every fault is one ConfigError naming the flag, the path and the fix; nothing is written."""
    refuse_wrong_kind(flag, path, folder=what == "folder")
    if os.path.exists(path) and not overwrite:
        raise ConfigError(flag, str(path), f"already exists; pass --overwrite or another {what}")
    probe_writable(flag, path, Path(path).parent)


def check_writable(flag: str, path, folder: bool = False) -> None:
    """The check before a command spends time on an output it will write at `path` (a file, or with `folder` a
    folder it writes into, such as a run dir): nothing of the wrong kind is in the way, and this user can create
    files where it goes. Missing folders are created only when the output is written."""
    refuse_wrong_kind(flag, path, folder)
    target = Path(path)
    probe_writable(flag, path, target if folder and target.is_dir() else target.parent)


def refuse_wrong_kind(flag: str, path, folder: bool) -> None:
    """A file where a folder is wanted, or a folder where a file is, is refused (an existing path of the right
    kind, or none, passes)."""
    target = Path(path)
    if target.exists() and target.is_dir() != folder:
        raise ConfigError(flag, str(path), f"is a {'file' if folder else 'folder'}; give the path of a "
                                           f"{'folder' if folder else 'file'}")


def probe_writable(flag: str, path, where: Path) -> None:
    """Whether this user can create files in `where`, or in its nearest existing folder when `where` does not
    exist yet: a probe file is created there and removed at once (permission bits alone do not say it: root
    ignores them, and a read-only mount refuses even root). A file on the way is refused too."""
    probe_in = Path(where)
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise ConfigError(flag, str(path), f"lies under {probe_in}, which is a file, not a folder; choose another path")
    probe = probe_in / f".cogvx-write-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(flag, str(path), f"cannot be written: creating a file in {probe_in} fails ({error.strerror});"
                                           f" choose a folder this user can write, or fix its permissions or free "
                                           f"space") from None


def parse_size(field_name: str, text: str) -> tuple[int, int]:
    """(height, width) of HEIGHTxWIDTH in pixels."""
    try:
        height, width = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ConfigError(field_name, text, "write HEIGHTxWIDTH in pixels, e.g. 480x720") from None
    return height, width
