"""Resolve a Config from a preset, an optional YAML/TOML file and `key=value` overrides."""
from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from cogvx_mega.config.presets import get_preset
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.schema import Config


def load_config(preset: Optional[str] = None, config_file: Optional[str] = None,
                overrides: Sequence[str] = ()) -> Config:
    """Preset defaults, then the file's values, then command-line overrides; validated."""
    return resolve_config(get_preset, "cogvideox-2b", preset, config_file, overrides, example="training.lr=1e-4")


def resolve_config(preset_of: Callable[[str], Any], default_preset: str, preset: Optional[str] = None,
                   config_file: Optional[str] = None, overrides: Sequence[str] = (), example: str = "section.field=1"):
    """A config of nested dataclasses (with a `validate()`): `preset_of(name)` (the --preset, else the file's
    `preset:`, else `default_preset`), then the file's values, then `section.field=value` overrides."""
    file_values: dict = {}
    if config_file is not None:
        file_values = read_config_file(config_file)
    preset_name = preset or file_values.pop("preset", None) or default_preset
    file_values.pop("preset", None)
    config = preset_of(preset_name)
    apply_nested(config, file_values, prefix="")
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError("override", override, f"write overrides as section.field=value, e.g. {example}")
        set_field(config, key.strip(), yaml.safe_load(raw))
    return config.validate()


def read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ConfigError("--config", path, "no such file; pass the path of a .yaml or .toml config")
    text = file.read_text()
    try:
        if file.suffix == ".toml":
            values = tomllib.loads(text)
        elif file.suffix in (".yaml", ".yml", ".json"):
            values = yaml.safe_load(text) or {}
        else:
            raise ConfigError("--config", path, "use a .yaml, .yml, .json or .toml file")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        raise ConfigError("--config", path, f"could not parse it: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError("--config", path, "the file must hold a mapping of sections (model:, training:, ...)")
    return values


def apply_nested(obj: Any, values: dict, prefix: str) -> None:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(obj, key, None)):
            apply_nested(getattr(obj, key), value, prefix=f"{path}.")
        else:
            set_field(obj, key, value, path=path)


def set_field(root: Any, dotted: str, value: Any, path: Optional[str] = None) -> None:
    """Set `a.b.c` on nested dataclasses, coercing to the declared type."""
    path = path or dotted
    *parents, leaf = dotted.split(".")
    obj = root
    for name in parents:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, name):
            raise ConfigError(path, value, f"unknown config section {name!r}")
        obj = getattr(obj, name)
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    if leaf not in fields:
        raise ConfigError(path, value, f"unknown field; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(type(obj))
    setattr(obj, leaf, coerce(value, hints[leaf], path))


def coerce(value: Any, annotation: Any, path: str) -> Any:
    args = typing.get_args(annotation)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(path, value, "this field cannot be empty")
    target = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, value, "use true or false")
    if target is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "use an integer")
        return value
    if target is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(path, value, "use a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, "use a number")
        return float(value)
    if target is str:
        return str(value)
    return value


def write_resolved_config(config: Config, run_dir: str) -> Path:
    """Write the resolved config into the run directory (atomically) and return its path."""
    os.makedirs(run_dir, exist_ok=True)
    path = Path(run_dir) / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    try:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        os.replace(tmp, path)
    except OSError as error:  # a full disk: no half file, and the error names the file
        raise OSError(error.errno, error.strerror, str(path)) from error
    finally:
        tmp.unlink(missing_ok=True)
    return path
