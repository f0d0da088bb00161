"""`cogvx convert` for the transformer: diffusers folder -> project, project -> diffusers, SAT -> project.

The formats and key maps live in `cogvx_mega.checkpoint.transformer`; this module composes reader, map,
strict check and atomic writer for each direction. Every output folder holds a conversion marker
(`tools.output_marker`), and `overwrite` replaces only such a folder or an empty one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from cogvx_mega.checkpoint.meta import is_project_checkpoint
from cogvx_mega.checkpoint.reader import read_project_checkpoint
from cogvx_mega.checkpoint.single_file import save_project_checkpoint
from cogvx_mega.checkpoint.transformer import (check_project_state, diffusers_to_project, expected_shapes,
                                               read_diffusers_folder, read_sat_transformer, sat_to_project,
                                               write_diffusers_folder)
from cogvx_mega.checkpoint.verify import refuse_damaged
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.tools.output_marker import (CONVERSION, conversion_record, marked_directory,
                                            refuse_unsafe_replacement)

DIRECTIONS = ("diffusers-to-project", "project-to-diffusers", "sat-to-project")


def convert_transformer(direction: str, source: str, destination: str, preset: Optional[str] = None,
                        config_file: Optional[str] = None, overrides: Sequence[str] = (), verify: bool = True,
                        trust_pickle: bool = False, overwrite: bool = False) -> Path:
    """Convert `source` to `destination` in `direction`. SAT sources are a `mp_rank_00_model_states.pt`, its
    iteration folder, the checkpoint folder with `latest`, or a released `<name>-sat` folder; they are unpickled
    with torch's weights-only rules unless `trust_pickle`. The destination is checked before anything is read,
    and nothing is created before the source is read, mapped and checked."""
    if direction not in DIRECTIONS:
        raise ConfigError("direction", direction, f"choose one of {', '.join(DIRECTIONS)}")
    refuse_unsafe_replacement("DESTINATION", destination, overwrite, CONVERSION)
    write = converted(direction, source, preset, config_file, overrides, verify, trust_pickle)
    with marked_directory(destination, CONVERSION, **conversion_record(direction, source)) as staging:
        write(staging)
    return Path(destination)


def converted(direction: str, source: str, preset: Optional[str], config_file: Optional[str],
              overrides: Sequence[str], verify: bool, trust_pickle: bool) -> Callable[[Path], object]:
    """Read `source`, map it to the other format and check it; returns what writes the result to a folder
    (which the writer replaces atomically)."""
    if direction == "diffusers-to-project":
        if is_project_checkpoint(source):
            raise ConfigError("SOURCE", source, "is a cogvx-mega checkpoint; use project-to-diffusers")
        model, state = read_diffusers_folder(source)
        ours = diffusers_to_project(state, model)
        check_project_state(ours, model, reference=expected_shapes(model))
        return lambda folder: save_project_checkpoint(folder, model, ours, extra={"converted_from": "diffusers"})
    if direction == "project-to-diffusers":
        model, state, _ = read_project_checkpoint(source, refuse_damaged if verify else None)
        check_project_state(state, model, reference=expected_shapes(model))
        return lambda folder: write_diffusers_folder(state, model, str(folder))
    if not (preset or config_file):
        raise ConfigError("--preset", None, "SAT checkpoints carry no config: name the model with --preset "
                                            "(and --config / overrides for custom sizes)")
    from cogvx_mega.config import load_config

    model = load_config(preset, config_file, overrides).model
    ours = sat_to_project(read_sat_transformer(source, trust_pickle), model)
    check_project_state(ours, model, reference=expected_shapes(model))
    return lambda folder: save_project_checkpoint(folder, model, ours, extra={"converted_from": "sat"})
