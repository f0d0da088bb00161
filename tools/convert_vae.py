"""`cogvx convert vae-*`: diffusers VAE folder <-> project VAE checkpoint, SAT VAE -> project.

The formats and the SAT key map live in `cogvx_mega.checkpoint.vae`. Every output folder holds a conversion
marker (`tools.output_marker`), and `overwrite` replaces only such a folder or an empty one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from cogvx_mega.checkpoint.meta import is_project_checkpoint
from cogvx_mega.checkpoint.vae import (read_diffusers_vae_folder, read_sat_vae, read_vae_checkpoint,
                                       sat_vae_to_project, save_vae_checkpoint, write_diffusers_vae_folder)
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.tools.output_marker import (CONVERSION, conversion_record, marked_directory,
                                            refuse_unsafe_replacement)
from cogvx_mega.vae import vae_preset

DIRECTIONS = ("vae-diffusers-to-project", "vae-project-to-diffusers", "vae-sat-to-project")


def convert_vae(direction: str, source: str, destination: str, preset: Optional[str] = None,
                verify: bool = True, trust_pickle: bool = False, overwrite: bool = False) -> Path:
    """Convert `source` to `destination` in `direction`. A SAT source is `3d-vae.pt` (or a folder holding it,
    or a full fine-tune's checkpoint with `first_stage_model.*`), unpickled with torch's weights-only rules
    unless `trust_pickle`. The destination is checked before anything is read, and nothing is created before
    the source is read and mapped."""
    if direction not in DIRECTIONS:
        raise ConfigError("direction", direction, f"choose one of {', '.join(DIRECTIONS)}")
    refuse_unsafe_replacement("DESTINATION", destination, overwrite, CONVERSION)
    write = converted(direction, source, preset, verify, trust_pickle)
    with marked_directory(destination, CONVERSION, **conversion_record(direction, source)) as staging:
        write(staging)
    return Path(destination)


def converted(direction: str, source: str, preset: Optional[str], verify: bool,
              trust_pickle: bool) -> Callable[[Path], object]:
    """Read `source` and map it to the other format; returns what writes the result to a folder (which the
    writer replaces atomically)."""
    if direction == "vae-diffusers-to-project":
        if is_project_checkpoint(source):
            raise ConfigError("SOURCE", source, "is a cogvx-mega checkpoint; use vae-project-to-diffusers")
        config, state = read_diffusers_vae_folder(source)
        return lambda folder: save_vae_checkpoint(str(folder), state, config, extra={"converted_from": "diffusers"})
    if direction == "vae-project-to-diffusers":
        config, state = read_vae_checkpoint(source, verify)
        return lambda folder: write_diffusers_vae_folder(state, config, str(folder))
    config = vae_preset(preset or "cogvideox-2b")  # SAT VAE checkpoints carry no config: CogVideoX's architecture
    state = sat_vae_to_project(read_sat_vae(source, trust_pickle), config)
    return lambda folder: save_vae_checkpoint(str(folder), state, config, extra={"converted_from": "sat"})
