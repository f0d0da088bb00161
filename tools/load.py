"""Building models from checkpoints of any accepted format (the readers in `cogvx_mega.checkpoint` return
tensors only)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.meta import is_project_checkpoint
from ..checkpoint.vae import read_diffusers_vae_folder, read_vae_checkpoint
from ..config.schema import ConfigError


def load_vae(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A `CogVideoXVAE` in eval mode from a diffusers VAE folder, a pipeline folder (vae/) or a cogvx-mega VAE
    checkpoint."""
    from ..vae import CogVideoXVAE

    folder = Path(path)
    if not folder.exists():
        raise ConfigError("path", str(path), "no such folder; pass a diffusers AutoencoderKLCogVideoX folder or a "
                                             "cogvx-mega VAE checkpoint folder")
    if is_project_checkpoint(folder):
        config, state = read_vae_checkpoint(str(folder))
    else:
        config, state = read_diffusers_vae_folder(str(folder))
    with torch.device("meta"):
        model = CogVideoXVAE(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()
