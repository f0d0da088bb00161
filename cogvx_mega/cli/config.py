"""`cogvx config show`: the resolved config, as YAML, of a preset, a config file and overrides, or of a run dir
(the config.yaml a run wrote, with any overrides on top: what a `--resume` with them would train)."""
from __future__ import annotations

import argparse
from pathlib import Path

NAME = "config"
HELP = "show the resolved config of a preset/config file/overrides or of a run dir"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="print the resolved config as YAML (every field, every default)")
    show.add_argument("--preset", help="named preset (tiny, cogvideox-2b, cogvideox-5b, ...)")
    show.add_argument("--config", dest="config_file", help="YAML/TOML config file applied over the preset")
    show.add_argument("--run-dir", help="a run's folder: its config.yaml (the config the run trained with)")
    show.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    import yaml

    from cogvx_mega.config import load_config
    from cogvx_mega.config.errors import ConfigError

    config_file = args.config_file
    if args.run_dir is not None:
        if config_file is not None:
            raise ConfigError("--run-dir", args.run_dir, "give --run-dir or --config, not both")
        config_file = str(Path(args.run_dir) / "config.yaml")
        if not Path(config_file).is_file():
            raise ConfigError("--run-dir", args.run_dir, "holds no config.yaml: pass the folder a run wrote (its "
                                                         "--run-dir), or --preset/--config")
    config = load_config(args.preset, config_file, args.overrides)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0
