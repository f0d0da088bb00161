"""`cogvx convert DIRECTION SRC DST`: checkpoints between diffusers, SAT and cogvx-mega (transformer and VAE)."""
from __future__ import annotations

import argparse
import os

from cogvx_mega.cli.arguments import add_config_arguments

NAME = "convert"
HELP = "convert checkpoints between diffusers, SAT and cogvx-mega"
DIRECTIONS = ("diffusers-to-project", "project-to-diffusers", "sat-to-project", "vae-diffusers-to-project",
              "vae-project-to-diffusers", "vae-sat-to-project")
SAT_DIRECTIONS = ("sat-to-project", "vae-sat-to-project")  # the ones that read pickles (SAT's .pt files)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("direction", choices=DIRECTIONS)
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DESTINATION when it holds a previous conversion (it has cogvx_convert.json) "
                             "or is empty; any other existing path is refused and kept")
    parser.add_argument("--no-verify", action="store_true",
                        help="read a cogvx-mega SOURCE without checking its files' sizes and CRC32C (a damaged one is "
                             "refused otherwise)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="SAT directions: unpickle SOURCE without torch's weights-only rules. Only for a file "
                             "from a source you trust: unpickling can run any code the file holds. Without it, "
                             "only tensors, plain values and what SAT saves besides (argparse.Namespace, numpy's "
                             "RNG state) are read")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cogvx_mega.config.errors import ConfigError

    if not os.path.exists(args.source):
        raise ConfigError("SOURCE", args.source, "no such file or folder")
    # DESTINATION is checked by the converter, first thing
    if args.trust_pickle and args.direction not in SAT_DIRECTIONS:
        raise ConfigError("--trust-pickle", True, f"only {' and '.join(SAT_DIRECTIONS)} read pickle files; "
                                                  f"{args.direction} reads tensors only (safetensors, or a .bin "
                                                  f"under torch's weights-only rules): drop the flag")
    if args.direction.startswith("vae-"):
        from cogvx_mega.tools.convert_vae import convert_vae

        convert_vae(args.direction, args.source, args.destination, preset=args.preset, verify=not args.no_verify,
                    trust_pickle=args.trust_pickle, overwrite=args.overwrite)
    else:
        from cogvx_mega.tools.convert_transformer import convert_transformer

        convert_transformer(args.direction, args.source, args.destination, preset=args.preset,
                            config_file=args.config_file, overrides=args.overrides, verify=not args.no_verify,
                            trust_pickle=args.trust_pickle, overwrite=args.overwrite)
    print(f"wrote {args.destination}")
    return 0
