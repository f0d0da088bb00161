"""`cogvx report RUN_DIR`: one HTML page of a training run (loss and validation curves, the loss per timestep bin,
the sample videos, the config) that opens in a browser offline."""
from __future__ import annotations

import argparse

NAME = "report"
HELP = "write a training run's HTML report (plots, per-bin validation loss, sample videos)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's folder (its metrics.jsonl)")
    parser.add_argument("--output", default=None, help="the page to write (default RUN_DIR/report.html)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output (RUN_DIR/report.html "
                                                                 "is always rewritten)")


def run(args: argparse.Namespace) -> int:
    from cogvx_mega.tools.report import build_report

    print(f"wrote {build_report(args.run_dir, args.output, overwrite=args.output is None or args.overwrite)}")
    return 0
