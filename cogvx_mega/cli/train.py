"""`cogvx train`: train (one process, or every rank under torchrun), or print the plan with --dry-run."""
from __future__ import annotations

import argparse
import os

from cogvx_mega.cli.arguments import add_config_arguments, add_training_flags, resolve_config

NAME = "train"
HELP = "train (single process or under torchrun)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_training_flags(parser)
    parser.add_argument("--resume", help="'auto' (newest complete checkpoint of the run) or a checkpoint folder")
    parser.add_argument("--init-from", metavar="PATH",
                        help="start from these weights (diffusers transformer or pipeline folder, single-file or "
                             "sharded cogvx-mega checkpoint) at step 0 with a fresh optimizer")
    parser.add_argument("--init-lora", metavar="DIR",
                        help="with --init-from: merge this diffusers/PEFT LoRA (pytorch_lora_weights.safetensors) "
                             "into the weights before training")
    parser.add_argument("--no-verify", action="store_true",
                        help="read the --init-from weights (and a LoRA run's base) without checking their files' "
                             "sizes and CRC32C; a resumed checkpoint is always checked")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the layout, each pipeline rank's layers and parameter counts; do not train")
    parser.add_argument("--world-size", type=int, help="with --dry-run: the world size to plan for")


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if args.dry_run:
        from cogvx_mega.tools.plan import describe_layout

        world = args.world_size or int(os.environ.get("WORLD_SIZE", config.parallel.model_parallel_size))
        print(describe_layout(config, world))
        return 0
    from cogvx_mega.run import training

    training.run_training(config, resume=args.resume, init_from=args.init_from, init_lora=args.init_lora,
                          verify=not args.no_verify)
    return 0
