"""`cogvx`: the parser of every command, the command's logging, and the mapping from errors to exit codes."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from cogvx_mega.cli import (checkpoint, convert, data, demo, export, launch, plan, sample, scaling, train,
                            vae)
from cogvx_mega.cli.arguments import parse_with_overrides, verbose_parent

logger = logging.getLogger("cogvx_mega")

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # training.max_skipped_steps steps in a row were skipped
# in the order `cogvx --help` lists them
COMMANDS = (train, demo, convert, data, vae, sample, export, checkpoint, plan, scaling, launch)


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
    from cogvx_mega.vae.time_split import VAEInputError

    args = parse_with_overrides(build_parser(), argv)
    configure_logging(args.verbose)
    try:
        return args.run(args)
    except (ConfigError, ConversionError, FileNotFoundError, VAEInputError, MediaError) as error:
        print(f"cogvx: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as error:
        print(f"cogvx: error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
