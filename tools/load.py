"""Building models from checkpoints of any accepted format (the readers in `cogvx_mega.checkpoint` return
tensors only)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from cogvx_mega.checkpoint.vae import read_vae_weights
from cogvx_mega.config.errors import ConfigError


def load_transformer(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, backend: str = "local",
                     verify: bool = True, weights: Optional[str] = None, **model_overrides):
    """The whole transformer in this process from a diffusers folder or a cogvx-mega checkpoint (see
    `cogvx_mega.from_pretrained`), with `model_overrides` of the fields in LOADER_MODEL_FIELDS. A project
    checkpoint is verified before it is read (`verify=False`: read it as it is)."""
    import dataclasses

    from cogvx_mega.checkpoint.reader import read_transformer_checkpoint
    from cogvx_mega.checkpoint.transformer import load_project_state
    from cogvx_mega.checkpoint.verify import refuse_damaged
    from cogvx_mega.config.model import LOADER_MODEL_FIELDS
    from cogvx_mega.model.transformer import build_model

    if not Path(path).exists():
        raise ConfigError("path", str(path), "no such file or folder; pass a diffusers transformer folder or a "
                                             "cogvx-mega checkpoint folder")
    for name in model_overrides:
        if name not in LOADER_MODEL_FIELDS:
            raise ConfigError(name, model_overrides[name], f"from_pretrained overrides only the fields that choose "
                                                           f"how the model runs ({', '.join(LOADER_MODEL_FIELDS)}); "
                                                           f"the others describe the checkpoint's weights")
    model_config, state, _ = read_transformer_checkpoint(path, refuse_damaged if verify else None, weights)
    model_config = dataclasses.replace(model_config, backend=backend, **model_overrides)
    model_config.validate()
    model = build_model(model_config, device="cpu", params_dtype=torch.float32, run_device=device)
    load_project_state(model, state, model_config)
    return model.to(device=device, dtype=dtype).eval()


def load_vae(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, verify: bool = True):
    """A `CogVideoXVAE` in eval mode from a diffusers VAE folder, a pipeline folder (vae/) or a cogvx-mega VAE
    checkpoint (verified before it is read, unless `verify=False`)."""
    from cogvx_mega.vae import CogVideoXVAE

    folder = Path(path)
    if not folder.exists():
        raise ConfigError("path", str(path), "no such folder; pass a diffusers AutoencoderKLCogVideoX folder or a "
                                             "cogvx-mega VAE checkpoint folder")
    config, state = read_vae_weights(str(folder), verify)
    with torch.device("meta"):
        model = CogVideoXVAE(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()
