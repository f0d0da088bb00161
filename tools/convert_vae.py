"""`cogvx convert vae-*`: diffusers VAE folder <-> project VAE checkpoint, SAT VAE -> project.

The formats and the SAT key map live in `cogvx_mega.checkpoint.vae`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from cogvx_mega.checkpoint.meta import is_project_checkpoint
from cogvx_mega.checkpoint.vae import (read_diffusers_vae_folder, read_sat_vae, read_vae_checkpoint,
                                       sat_vae_to_project, save_vae_checkpoint, write_diffusers_vae_folder)
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.vae import vae_preset

DIRECTIONS = ("vae-diffusers-to-project", "vae-project-to-diffusers", "vae-sat-to-project")


def convert_vae(direction: str, source: str, destination: str, preset: Optional[str] = None,
                verify: bool = True, trust_pickle: bool = False) -> Path:
    """Convert `source` to `destination` in `direction`. A SAT source is `3d-vae.pt` (or a folder holding it,
    or a full fine-tune's checkpoint with `first_stage_model.*`), unpickled with torch's weights-only rules
    unless `trust_pickle`."""
    if direction == "vae-diffusers-to-project":
        if is_project_checkpoint(source):
            raise ConfigError("SOURCE", source, "is a cogvx-mega checkpoint; use vae-project-to-diffusers")
        config, state = read_diffusers_vae_folder(source)
        return save_vae_checkpoint(destination, state, config, extra={"converted_from": "diffusers"})
    if direction == "vae-project-to-diffusers":
        config, state = read_vae_checkpoint(source, verify)
        return write_diffusers_vae_folder(state, config, destination)
    if direction == "vae-sat-to-project":  # SAT VAE checkpoints carry no config; the architecture is CogVideoX's
        config = vae_preset(preset or "cogvideox-2b")
        state = sat_vae_to_project(read_sat_vae(source, trust_pickle), config)
        return save_vae_checkpoint(destination, state, config, extra={"converted_from": "sat"})
    raise ConfigError("direction", direction, f"choose one of {', '.join(DIRECTIONS)}")
