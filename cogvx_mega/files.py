"""One file written whole or not at all, with the permissions the process umask gives a plain create.

The level below every other part (tests/unit/test_layering.py): latent files, videos and manifests use it, and
`checkpoint/atomic.py` builds folders on the same umask rule.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator


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
    file is removed and `path` is left as it was."""
    target = Path(path)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}{target.suffix}"
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~process_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
