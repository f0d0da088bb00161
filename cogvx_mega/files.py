"""One file written whole or not at all, with the permissions the process umask gives a plain create; and what a
full disk looks like behind the many ways libraries report it.

The level below every other part (tests/unit/test_layering.py): latent files, videos and manifests use it, and
`checkpoint/atomic.py` builds folders on the same rules.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from pathlib import Path
from typing import Iterator, Optional

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Failed writes that lose the OS's reason: torch's zip writer to a path ("basic_ios::clear: iostream error", then
# "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", or in other versions "PytorchStreamWriter
# failed writing file ..."), and numpy's `tofile` ("1000000 requested and 65504 written"). They mean a full disk
# only when the disk they wrote to is (nearly) full.
_REASON_LOST = re.compile(r"unexpected pos \d+ vs \d+|basic_ios::clear|PytorchStreamWriter failed writing"
                          r"|\d+ requested and \d+ written")
# our hidden temporary names (`.NAME.tmp`, `.NAME.tmp-xxxxxxxx`, `.NAME.tmp-xxxxxxxx.SUFFIX`), shown as NAME
_HIDDEN_TEMPORARY = re.compile(r"^\.(?P<name>.+?)\.tmp(-[0-9a-f]{8}(\.[^./]+)?)?$")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".gif")
"""What a file's suffix says it holds (media scans, a run's sample videos beside its latent files)."""


def video_files(paths) -> list:
    """The paths among `paths` whose suffix is a video's (a training row's `samples` also lists latent files)."""
    return [path for path in paths if isinstance(path, str) and Path(path).suffix.lower() in VIDEO_SUFFIXES]

def process_umask() -> int:
    """The process umask, read without changing it where Linux reports it (`os.umask` can only be read by setting
    it, which for a moment gives other threads' new files a wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path` (`.NAME.tmp-xxxxxxxx.SUFFIX`: writers that choose a format by
    the suffix still see it) for the caller to write; when the block ends without an error the file gets mode
    0666 less the umask (safetensors writes 0600 whatever the umask, and a team on a shared filesystem could not
    read the result) and is renamed onto `path` in one step. On any error, a full disk included, the temporary
    file is removed and `path` is left as it was; a full disk is raised as the OSError naming `path` (writers such
    as safetensors name no file)."""
    target = Path(path)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}{target.suffix}"
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~process_umask())
        os.replace(tmp, target)
    except BaseException as error:
        full = full_disk_error(error, target, look_at=tmp)
        if full is not None:
            raise full from error
        raise
    finally:
        tmp.unlink(missing_ok=True)


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
