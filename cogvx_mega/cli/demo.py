"""`cogvx demo`: the whole path on CPU (clips, manifest, latent cache, training, diffusers folder, plot)."""
from __future__ import annotations

import argparse

NAME = "demo"
HELP = "train the tiny preset on generated data on CPU, convert, plot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=300)


def run(args: argparse.Namespace) -> int:
    from cogvx_mega.config.errors import check_writable
    from cogvx_mega.demo import run_demo

    check_writable("--run-dir", args.run_dir, folder=True)  # before the clips, the cache and the training
    run_demo(run_dir=args.run_dir, steps=args.steps)
    return 0
