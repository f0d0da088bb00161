"""Atomic folder writes: build in a hidden temporary sibling, then rename into place.

A reader never sees a half-written folder, and a process killed at any moment leaves either the old
folder, the new one, or (between the two renames of a replacement) the old one under a hidden name
that `repair_interrupted_swap` puts back on the next start.

A folder put in place gets the permissions the process umask gives a plain create (files 0666, folders 0777,
less the umask), whatever its writers did: safetensors 0.8 writes every file through a temporary file created
0600 and renamed into place, and `shutil.copytree` copies its source's modes, so without this a release or a
converted checkpoint would be readable by its owner alone.

A write that fills the disk leaves nothing behind either (the temporary folder or file is removed) and says so
as an OSError naming what was being written (`full_disk_error`): libraries report a full disk in their own ways,
and `cogvx` turns that OSError into one line.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Iterator

from cogvx_mega.files import full_disk_error, process_umask

logger = logging.getLogger(__name__)

_OLD_MARK = ".old-"
_TMP_MARK = ".tmp"



def hidden_sibling(final: Path, kind: str) -> Path:
    """`.NAME.tmp-xxxx` / `.NAME.old-xxxx` beside `final` (hidden, so no listing picks it up)."""
    return final.parent / f".{final.name}{kind}{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` in one rename, on error it is removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    repair_interrupted_swap(final)
    tmp = hidden_sibling(final, _TMP_MARK + "-")
    tmp.mkdir()
    with removed_on_error(tmp, final):
        yield tmp
        swap_into_place(tmp, final)


@contextlib.contextmanager
def removed_on_error(tmp: Path, final: Path) -> Iterator[None]:
    """Remove `tmp` (a folder or a file) when the block fails; a full disk is raised as the OSError of writing
    `final` (`full_disk_error`, decided before `tmp` is removed and frees its space)."""
    try:
        yield
    except BaseException as error:
        full = full_disk_error(error, final, look_at=tmp)
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if full is not None:
            raise full from error
        raise


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. An existing `final` is first moved aside to a hidden `.old-` twin, which is
    removed only after the new folder is in place; a kill between the two renames leaves the complete old
    folder under that twin, and `repair_interrupted_swap` restores it. Before the rename, everything under `tmp`
    gets the permissions of the process umask (`apply_umask`)."""
    apply_umask(tmp)
    if final.exists():
        old = hidden_sibling(final, _OLD_MARK)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def apply_umask(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the permission bits a plain create would: folders 0777 and files 0666
    (0777 where the file had an execute bit) less the process umask. Other mode bits (a shared folder's setgid)
    are kept; symbolic links, and what they point to, are left alone. Only what differs is changed."""
    umask = process_umask()

    def fix(path: str, is_folder: bool) -> None:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            return
        wanted = 0o777 if is_folder or mode & 0o111 else 0o666
        target = (mode & 0o7000) | (wanted & ~umask)
        if stat.S_IMODE(mode) != target:
            os.chmod(path, target)

    fix(os.fspath(root), True)
    for folder, folders, files in os.walk(root):
        for name in folders:
            fix(os.path.join(folder, name), True)
        for name in files:
            fix(os.path.join(folder, name), False)


def interrupted_swaps(final: Path) -> list[Path]:
    """The `.old-` twins of `final` that a replacement left behind."""
    if not final.parent.is_dir():
        return []
    prefix = f".{final.name}{_OLD_MARK}"
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix))


def repair_interrupted_swap(final: str | os.PathLike) -> bool:
    """Undo a replacement killed between its two renames: when `final` is missing and an `.old-` twin
    exists, rename the twin back (the new folder had not been put in place, so the old one is the last
    complete version). Twins beside an existing `final` are leftovers of a finished swap and are removed.
    Returns whether a folder was restored."""
    final = Path(final)
    twins = interrupted_swaps(final)
    restored = False
    if twins and not final.exists():
        os.replace(twins[-1], final)
        logger.warning("restored %s from %s (a replacement was interrupted between its two renames)",
                       final, twins[-1].name)
        twins, restored = twins[:-1], True
    for twin in twins:
        shutil.rmtree(twin, ignore_errors=True)
    return restored


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file by writing a hidden temporary file and renaming it over `path`."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_sibling(final, _TMP_MARK + "-")
    with removed_on_error(tmp, final):
        tmp.write_text(text)
        os.replace(tmp, final)
    return final
