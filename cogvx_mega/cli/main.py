"""`cogvx`: the parser of every command, the command's logging, and the mapping from errors to exit codes."""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

from cogvx_mega.files import FULL_DISK_ERRNOS, full_disk_error, shown_path
from cogvx_mega.cli import (checkpoint, config, convert, data, demo, export, launch, plan, report, sample,
                            scaling, train, vae)
from cogvx_mega.cli.arguments import parse_with_overrides, verbose_parent

logger = logging.getLogger("cogvx_mega")

# exit statuses: 0 done; 1 the machine's fault (full disk, permissions: OSError); 2 a user's input (ConfigError and
# the like, before anything is written); 3 diverged; 128 + N stopped by signal N after a checkpoint (130: Ctrl-C)
EXIT_SYSTEM_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # training.max_skipped_steps steps in a row were skipped
# in the order `cogvx --help` lists them
COMMANDS = (train, demo, convert, data, vae, sample, export, checkpoint, config, plan, scaling, launch, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvx", description="CogVideoX training on megatron-core")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subcommands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        sub = subcommands.add_parser(command.NAME, parents=[verbose_parent()], help=command.HELP)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def quiet_libraries() -> None:
    """Keep megatron's import-time and construction-time notices (no Transformer Engine, no Apex, deprecated
    config scopes) out of the command's output; `-v` shows them. Errors still come through."""
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", module=r"transformer_engine(\.|$)")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled, unavailable or uninitialized")
    warnings.filterwarnings("ignore", message=r".*deprecating ShardedTensor")  # megatron's loads still use it
    logging.getLogger("megatron").setLevel(logging.ERROR)
    # its writer processes' failures (a full disk) come back as the save's exception, which is reported once
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(logging.CRITICAL)


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (a handler made in an earlier main() of the same process, e.g. a
    notebook or a test, must not write to a stream that has since been replaced or closed)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(verbose: bool) -> None:
    """Our own logger only; other libraries keep theirs (megatron's is only quietened)."""
    if not verbose:
        quiet_libraries()
    for previous in [h for h in logger.handlers if getattr(h, "_cogvx_cli", False)]:
        logger.removeHandler(previous)  # main() called again in one process (tests, notebooks)
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._cogvx_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def main(argv: Optional[Sequence[str]] = None) -> int:
    from cogvx_mega.checkpoint.meta import ConversionError
    from cogvx_mega.config.errors import ConfigError
    from cogvx_mega.data.manifest import MediaError
    from cogvx_mega.training import TrainingDiverged
    from cogvx_mega.training.interrupts import TrainingInterrupted
    from cogvx_mega.vae.time_split import VAEInputError

    args = parse_with_overrides(build_parser(), argv)
    configure_logging(args.verbose)
    try:
        with full_disk_left_to_the_command():
            return args.run(args)
    except (ConfigError, ConversionError, FileNotFoundError, VAEInputError, MediaError) as error:
        report_error(f"cogvx: error: {error}")
        return EXIT_USER_ERROR
    except TrainingDiverged as error:
        report_error(f"cogvx: error: {error}")
        return EXIT_DIVERGED
    except TrainingInterrupted as error:
        report_error(f"cogvx: {error}")
        return error.exit_status
    except KeyboardInterrupt:
        report_error("cogvx: interrupted (Ctrl-C)")
        return 128 + signal.SIGINT
    except BaseException as error:  # BaseException: torch's CheckpointException is one
        # the machine's: a full disk (however the writing library says it), a folder it may not write, a
        # read-only filesystem
        machine = full_disk_error(error) or (error if isinstance(error, OSError) else None)
        if machine is None:
            raise
        logger.debug("the OS error's traceback", exc_info=True)  # -v
        report_error(f"cogvx: error: {describe_os_error(machine)}")
        return EXIT_SYSTEM_ERROR


@contextlib.contextmanager
def full_disk_left_to_the_command() -> Iterator[None]:
    """While a command runs, a thread that dies of a full disk prints no traceback (-v logs it): the writers that
    write in threads (TensorBoard's event writer) hand the error to the command's next call, and the command
    reports it in one line. Any other error of a thread is printed as Python prints it."""
    previous = threading.excepthook

    def hook(args) -> None:
        if args.exc_value is not None and full_disk_error(args.exc_value) is not None:
            logger.debug("a full disk in thread %s", getattr(args.thread, "name", "?"),
                         exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def describe_os_error(error: OSError) -> str:
    """The error as the OS says it, and what to do for the ones a user meets (full disk, permissions). A full
    disk says what was being written, as far as that is known."""
    hints = {errno.ENOSPC: "free space there (or write elsewhere) and run it again",
             errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
             errno.EACCES: "this user may not write there: choose a folder you own, or fix its permissions",
             errno.EPERM: "this user may not write there: choose a folder you own, or fix its permissions",
             errno.EROFS: "that filesystem is read-only: write elsewhere"}
    if error.errno in FULL_DISK_ERRNOS:
        written = error.filename2 or error.filename  # a copy's destination is filename2
        if written is None:
            return (f"{os.strerror(error.errno)}; free space on the disk being written (or write elsewhere) and "
                    f"run it again")
        return f"{os.strerror(error.errno)} while writing {shown_path(written)}; {hints[error.errno]}"
    hint = hints.get(error.errno)
    return f"{error}; {hint}" if hint else str(error)


def report_error(line: str) -> None:
    """Write the job's error line once: alone, or under torchrun from the first rank that gets here (the ranks of
    one launch on a node share a marker file; another node's ranks write their own line, at most one per node).
    One write call, so lines of several processes never run together."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _first_to_report():
        logger.debug("%s (already reported by another rank)", line)
        return
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _first_to_report() -> bool:
    """Claim the launch's error marker (named after torchrun's agent process, its start time, the rendezvous and
    the restart); False when another rank has it."""
    import tempfile

    parent = os.getppid()
    try:
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"
    key = "-".join([str(parent), started, os.environ.get("TORCHELASTIC_RUN_ID", ""),
                    os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), os.environ.get("MASTER_PORT", "")])
    marker = Path(tempfile.gettempdir()) / f"cogvx-error-{key}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    except OSError:
        return True  # no marker possible: better twice than never
    return True
