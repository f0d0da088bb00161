"""Verified checkpoints: every file a checkpoint holds, with its size and CRC32C, listed in the metadata that
marks it complete (`cogvx_checkpoint.json`, key `files`).

At save, each rank checksums the files it wrote (megatron's torch_dist writes `__<rank>_<i>.distcp` per
rank; rank 0 also writes `.metadata`, `common.pt` and `metadata.json`) as soon as they are on disk, and rank
0 records them all before it renames the checkpoint into place. A check then reads only what it must:
- `verify_files(..., checksum_share=(r, n))`: the sizes of every file (a stat each), and the checksums of
  the files whose writer rank is r modulo n, so n ranks resuming together read every byte once between them;
- `verify_checkpoint(folder)`: one process, every size and checksum (`cogvx checkpoint verify`).
A checkpoint written before files were recorded verifies by its metadata alone ("unverified").
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.checkpoint.meta import META_FILE, read_checkpoint_meta

CHUNK_BYTES = 8 << 20
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def crc32c_of(path: Path) -> str:
    """The CRC32C of a file, read in chunks (the C implementation of google-crc32c: GB/s)."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            if not chunk:
                break
            checksum.update(chunk)
    return checksum.hexdigest().decode()


def record_files(folder: Path, names) -> dict[str, dict]:
    """{name: {"size", "crc32c"}} of these files of `folder`."""
    return {name: {"size": (folder / name).stat().st_size, "crc32c": crc32c_of(folder / name)} for name in names}


def files_written_by(folder: Path, rank: int) -> list[str]:
    """The files of a torch_dist checkpoint folder that rank `rank` wrote: its `__<rank>_*.distcp` shards; rank 0
    also everything that is not a rank's shard (megatron's metadata and common state)."""
    names = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name == META_FILE:
            continue
        match = _RANK_FILE.match(path.name)
        if (match and int(match.group(1)) == rank) or (not match and rank == 0):
            names.append(path.name)
    return names


def writer_rank(name: str) -> int:
    match = _RANK_FILE.match(name)
    return int(match.group(1)) if match else 0


@dataclass
class Verdict:
    folder: Path
    problems: list[str] = field(default_factory=list)
    """One line per damaged file: 'FILE: what is wrong'."""
    files: int = 0
    bytes: int = 0
    checksummed_bytes: int = 0
    recorded: bool = True
    """False for a checkpoint written before files were recorded (only its metadata could be checked)."""
    meta: Optional[dict] = None
    checksums: bool = True
    """Whether checksums were compared (a size-only check cannot see changed bytes)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def state(self) -> str:
        if self.problems:
            return "damaged: " + self.problems[0]
        if not self.recorded:
            return "unverified (written before files were recorded)"
        return "ok" if self.checksums else "sizes ok"


def read_meta_or_problem(folder: Path) -> tuple[Optional[dict], Optional[str]]:
    """The checkpoint's metadata, or what is wrong with it (missing, empty, not JSON, no format)."""
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        return None, f"{META_FILE}: missing"
    try:
        return read_checkpoint_meta(folder), None
    except ConfigError as error:
        return None, f"{META_FILE}: {error.fix.split(';')[0]}"


def verify_files(folder: str | os.PathLike, checksum_share: Optional[tuple[int, int]] = (0, 1)) -> Verdict:
    """Check a checkpoint folder against its recorded files: sizes always, checksums of the files whose writer
    rank is r mod n for `checksum_share` = (r, n) (None: no checksums)."""
    folder = Path(folder)
    verdict = Verdict(folder, checksums=checksum_share is not None)
    meta, problem = read_meta_or_problem(folder)
    if problem is not None:
        verdict.problems.append(problem)
        return verdict
    verdict.meta = meta
    recorded = meta.get("files")
    if not isinstance(recorded, dict):
        verdict.recorded = False
        return verdict
    for name, expected in sorted(recorded.items()):
        path = folder / name
        verdict.files += 1
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            verdict.problems.append(f"{name}: missing")
            continue
        verdict.bytes += size
        if size != expected["size"]:
            verdict.problems.append(f"{name}: {size:,} bytes, {expected['size']:,} recorded (truncated or overwritten)")
            continue
        if checksum_share is not None and writer_rank(name) % checksum_share[1] == checksum_share[0]:
            verdict.checksummed_bytes += size
            found = crc32c_of(path)
            if found != expected["crc32c"]:
                verdict.problems.append(f"{name}: CRC32C {found}, {expected['crc32c']} recorded (the bytes changed)")
    return verdict


def verify_checkpoint(folder: str | os.PathLike) -> Verdict:
    """Every size and every checksum, in this process."""
    return verify_files(folder, checksum_share=(0, 1))


NO_VERIFY_HINT = "read another checkpoint (`cogvx checkpoint list RUN_DIR` shows which verify), or pass --no-verify " \
                 "to read it as it is"


def refuse_damaged(folder: str | os.PathLike, verdict: Optional[Verdict] = None, flag: str = "checkpoint") -> None:
    """One clear error naming the damaged file when a project checkpoint does not verify (every size and
    checksum in this process, unless `verdict` is given). Folders that are not project checkpoints (no metadata
    file: a diffusers folder, a wrong path) and checkpoints without recorded files pass: their readers say what
    is wrong with them."""
    if not (Path(folder) / META_FILE).is_file():
        return
    verdict = verdict or verify_checkpoint(folder)
    if not verdict.ok:
        more = f" (and {len(verdict.problems) - 1} more)" if len(verdict.problems) > 1 else ""
        raise ConfigError(flag, str(folder), f"is damaged: {verdict.problems[0]}{more}; {NO_VERIFY_HINT}")


def verify_on_every_rank(folder: str | os.PathLike) -> Verdict:
    """`verify_files` shared by the ranks of a job (each checksums its share of the files); every rank gets the
    same verdict, with the problems any rank found. One process: everything."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return verify_checkpoint(folder)
    verdict = verify_files(folder, checksum_share=(dist.get_rank(), dist.get_world_size()))
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (verdict.problems, verdict.checksummed_bytes))
    problems = sorted({problem for found, _ in views for problem in found})
    verdict.problems = problems
    verdict.checksummed_bytes = sum(count for _, count in views)
    return verdict


def describe(meta: Optional[dict]) -> tuple[str, str]:
    """(step, layout) of a checkpoint's metadata, for listings."""
    if not meta:
        return "?", "?"
    layout = meta.get("layout") or {}
    parts = [f"{name}{layout.get(key, '?')}" for name, key in (
        ("TP", "tensor_model_parallel_size"), ("PP", "pipeline_model_parallel_size"),
        ("CP", "context_parallel_size"), ("DP", "data_parallel_size"))]
    kind = " LoRA" if meta.get("lora") else ""
    return str(meta.get("step", "?")), "x".join(parts) + kind


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())

