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
import errno
import logging
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Iterator, Optional

from cogvx_mega.files import process_umask

logger = logging.getLogger(__name__)

_OLD_MARK = ".old-"
_TMP_MARK = ".tmp"

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Failed writes that lose the OS's reason: torch's zip writer to a path ("basic_ios::clear: iostream error", then
# "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", or in other versions "PytorchStreamWriter
# failed writing file ..."), and numpy's `tofile` ("1000000 requested and 65504 written"). They mean a full disk
# only when the disk they wrote to is (nearly) full.
_REASON_LOST = re.compile(r"unexpected pos \d+ vs \d+|basic_ios::clear|PytorchStreamWriter failed writing"
                          r"|\d+ requested and \d+ written")
# our hidden temporary names (`.NAME.tmp`, `.NAME.tmp-xxxxxxxx`, `.NAME.tmp-xxxxxxxx.SUFFIX`), shown as NAME
_HIDDEN_TEMPORARY = re.compile(r"^\.(?P<name>.+?)\.tmp(-[0-9a-f]{8}(\.[^./]+)?)?$")


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


# --- a full disk ----------------------------------------------------------------------------------------------

def full_disk_error(error: BaseException, path: Optional[str | os.PathLike] = None,
                    look_at: Optional[str | os.PathLike] = None) -> Optional[OSError]:
    """The OSError (errno ENOSPC or EDQUOT) of a full disk behind `error`, or None when it is something else.

    Libraries say it in their own ways: an OSError anywhere in the chain of causes (`__cause__`, `__context__`),
    the per-rank failures of torch.distributed.checkpoint's CheckpointException, or only in their text
    (safetensors' "I/O error: No space left on device (os error 28)", tensorstore's "RESOURCE_EXHAUSTED: ...
    No space left on device [os_error_code='28']", shutil's copytree listing, a worker's error re-raised in
    another process). A write whose library lost the reason (`_REASON_LOST`) counts when the disk of `look_at`
    (or `path`) has next to nothing left; check that before removing what was written.

    The result names `path`, the thing being written, when given; otherwise the file the OSError names. Our
    hidden temporary names are shown as the names they would have had."""
    if isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        return None  # a stop, whatever it interrupted
    causes = list(_causes(error))
    texts = [_text(cause) for cause in causes]
    raised = [c for c in causes if isinstance(c, OSError) and c.errno in FULL_DISK_ERRNOS]
    said = [n for text in texts for n in FULL_DISK_ERRNOS if os.strerror(n) in text]
    if raised:  # the OS's own error, one that names its file first
        found = next((c for c in raised if (c.filename2 or c.filename) is not None), raised[0])
    elif said:
        found = OSError(said[0], os.strerror(said[0]))
    elif ((look_at or path) is not None and any(_REASON_LOST.search(text) for text in texts)
          and _nearly_full(look_at or path)):
        found = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    else:
        return None
    named = path if path is not None else (found.filename2 or found.filename)  # a copy's destination is filename2
    if named is None:
        return found
    return OSError(found.errno, os.strerror(found.errno), shown_path(named))


def _causes(error: BaseException) -> Iterator[BaseException]:
    """`error` and everything behind it, each once: causes and contexts, the failures a CheckpointException
    holds (rank -> (exception, traceback)), the members of an exception group."""
    queue, seen = [error], set()
    while queue:
        current = queue.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]
        failures = getattr(current, "failures", None)
        for failure in failures.values() if isinstance(failures, dict) else ():
            queue.append(failure[0] if isinstance(failure, tuple) and failure else failure)


def _text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # noqa: BLE001 - an exception whose text cannot be made says nothing
        return ""


def _nearly_full(path: str | os.PathLike) -> bool:
    """Whether the filesystem of `path` (or its nearest existing folder) has less than 1% of its size, and less
    than 64 MiB, left for this user: what a write that failed there for want of space leaves."""
    place = Path(path)
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        disk = os.statvfs(place)
    except OSError:
        return False
    free, size = disk.f_bavail * disk.f_frsize, disk.f_blocks * disk.f_frsize
    return free < min(64 * 2**20, size // 100 + 1)


def shown_path(path: str | os.PathLike) -> str:
    """`path` with our hidden temporary names (`.NAME.tmp`, `.NAME.tmp-xxxxxxxx[.SUFFIX]`) as their final NAME:
    what a user finds (or looks for) once the write is over."""
    parts = [match.group("name") if (match := _HIDDEN_TEMPORARY.match(part)) else part for part in Path(path).parts]
    return str(Path(*parts)) if parts else str(path)
