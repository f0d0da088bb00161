"""`cogvx checkpoint verify DIR` (exit 0: intact, 1: damaged, the bad file named) and `cogvx checkpoint list
RUN_DIR` (each checkpoint's step, layout, size and state)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

NAME = "checkpoint"
HELP = "check checkpoints: verify one (sizes and CRC32C of every file) or list a run's"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("verify", "list"))
    parser.add_argument("path", metavar="DIR", help="verify: a checkpoint folder; list: a run folder")
    parser.add_argument("--checksums", action="store_true", help="list: compare every file's CRC32C too (reads "
                                                                 "every checkpoint whole)")


def run(args: argparse.Namespace) -> int:
    from cogvx_mega.checkpoint.verify import verify_checkpoint
    from cogvx_mega.config.errors import ConfigError

    path = Path(args.path)
    if args.action == "list":
        from cogvx_mega.training.checkpoint import describe_run_checkpoints

        print(describe_run_checkpoints(path, checksums=args.checksums))
        return 0
    if not path.is_dir():
        raise ConfigError("DIR", args.path, "no such folder; pass a checkpoint folder (checkpoints/step_*)")
    started = time.perf_counter()
    verdict = verify_checkpoint(path)
    seconds = time.perf_counter() - started
    if not verdict.ok:
        for problem in verdict.problems:
            print(f"{path}: damaged: {problem}")
        return 1
    if not verdict.recorded:
        print(f"{path}: unverified: its metadata is readable but it lists no files (written before checkpoints "
              f"recorded them)")
        return 0
    print(f"{path}: ok: {verdict.files} files, {verdict.bytes / 1e6:,.1f} MB, sizes and CRC32C checked in "
          f"{seconds:.2f} s")
    return 0
