"""`cogvx convert DIRECTION SRC DST`: checkpoints between diffusers, SAT and cogvx-mega (transformer and VAE)."""
from __future__ import annotations

import argparse
import os

from cogvx_mega.cli.arguments import add_config_arguments

NAME = "convert"
HELP = "convert checkpoints between diffusers, SAT and cogvx-mega"
DIRECTIONS = ("diffusers-to-project", "project-to-diffusers", "sat-to-project", "vae-diffusers-to-project",
              "vae-project-to-diffusers", "vae-sat-to-project")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("direction", choices=DIRECTIONS)
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-verify", action="store_true",
                        help="read a cogvx-mega SOURCE without checking its files' sizes and CRC32C (a damaged one is "
                             "refused otherwise)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cogvx_mega.config.errors import ConfigError, refuse_existing_output

    if not os.path.exists(args.source):
        raise ConfigError("SOURCE", args.source, "no such file or folder")
    refuse_existing_output("DESTINATION", args.destination, args.overwrite)
    if args.direction.startswith("vae-"):
        from cogvx_mega.tools.convert_vae import convert_vae

        convert_vae(args.direction, args.source, args.destination, preset=args.preset, verify=not args.no_verify)
    else:
        from cogvx_mega.tools.convert_transformer import convert_transformer

        convert_transformer(args.direction, args.source, args.destination, preset=args.preset,
                            config_file=args.config_file, overrides=args.overrides, verify=not args.no_verify)
    print(f"wrote {args.destination}")
    return 0
