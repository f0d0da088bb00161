"""Arguments several commands share: the config (preset, file, `section.field=value` overrides) and the
training flags that stand for config fields."""
from __future__ import annotations

import argparse

# flag attribute -> the config field it sets
TRAINING_FLAGS = {"run_dir": "training.run_dir", "steps": "training.steps", "seed": "training.seed",
                  "micro_batch": "training.micro_batch_size", "data": "data.source", "vae": "data.vae",
                  "text_encoder": "data.text_encoder", "device": "training.device",
                  "tp": "parallel.tensor_model_parallel_size", "pp": "parallel.pipeline_model_parallel_size",
                  "vpp": "parallel.virtual_pipeline_model_parallel_size", "cp": "parallel.context_parallel_size"}
PATH_FLAGS = ("run_dir", "data", "vae", "text_encoder")  # quoted: paths stay strings


def verbose_parent() -> argparse.ArgumentParser:
    """A parent parser for every (sub)command, so that `-v` also works after the command's name."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging and library notices")
    return parent


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="named preset (tiny, cogvideox-2b, cogvideox-5b, ...)")
    parser.add_argument("--config", dest="config_file", help="YAML/TOML config file applied over the preset")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `cogvx train` that set config fields (TRAINING_FLAGS)."""
    parser.add_argument("--run-dir", help="where metrics, the resolved config and checkpoints go")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--micro-batch", type=int, help="samples per data-parallel rank per step")
    parser.add_argument("--data", help="a latent cache (cogvx data encode), a manifest (cogvx data scan; online "
                                       "mode, with --vae and --text-encoder), a latent folder or 'synthetic'")
    parser.add_argument("--vae", help="online mode: the VAE folder that encodes the manifest's clips")
    parser.add_argument("--text-encoder", help="online mode: the local T5 folder for the captions")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--tp", type=int, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=int, help="virtual pipeline stages per pipeline rank")
    parser.add_argument("--cp", type=int, help="context-parallel size")


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The `section.field=value` overrides the training flags given stand for."""
    out = []
    for attribute, key in TRAINING_FLAGS.items():
        value = getattr(args, attribute, None)
        if value is not None:
            out.append(f"{key}='{value}'" if attribute in PATH_FLAGS else f"{key}={value!s}")
    return out


def resolve_config(args: argparse.Namespace):
    """The validated Config of a command's --preset, --config, overrides and training flags."""
    from cogvx_mega.config import load_config

    return load_config(args.preset, args.config_file, [*args.overrides, *flag_overrides(args)])


def parse_with_overrides(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """parse_args that also takes `section.field=value` overrides after options (argparse stops collecting
    positionals at the first option)."""
    args, extra = parser.parse_known_args(argv)
    stray = [token for token in extra if token.startswith("-") or "=" not in token]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args
