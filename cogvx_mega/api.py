"""Public Python entry points."""
from __future__ import annotations

from pathlib import Path

import torch

from .config.schema import ConfigError, ModelConfig


def load_state_into(model, state: dict, model_config: ModelConfig) -> None:
    """Strict load of a project state dict (clear error on missing / unexpected / mis-shaped tensors)."""
    from .tools.convert import check_project_state

    reference = model.state_dict()
    check_project_state(state, model_config, reference={k: v for k, v in reference.items()
                                                         if not k.endswith("_extra_state")})
    with torch.no_grad():
        for key, value in state.items():
            if not key.endswith("_extra_state"):
                reference[key].copy_(value)


def from_pretrained(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, backend: str = "local"):
    """Load a diffusers transformer folder or a cogvx-mega checkpoint into a single-process model.

    The model is called like diffusers' CogVideoXTransformer3DModel:
    `model(latents [B,T,C,H,W], text_embeds [B,L,D], timesteps [B]) -> v_pred [B,T,C_out,H,W]`.
    """
    import dataclasses

    from .model.transformer import build_model
    from .parallel.state import initialize_parallel
    from .tools.convert import diffusers_to_project, read_diffusers_folder
    from .training.checkpoint import is_project_checkpoint, read_project_checkpoint

    folder = Path(path)
    if not folder.exists():
        raise ConfigError("path", str(path), "no such file or folder; pass a diffusers transformer folder or a "
                                             "cogvx-mega checkpoint folder")
    if is_project_checkpoint(folder):
        model_config, state, _ = read_project_checkpoint(folder)
    else:
        model_config, diffusers_state = read_diffusers_folder(str(folder))
        state = diffusers_to_project(diffusers_state, model_config)
    model_config = dataclasses.replace(model_config, backend=backend)
    model_config.validate()
    initialize_parallel(device=device)
    model = build_model(model_config, device="cpu", params_dtype=torch.float32)
    load_state_into(model, state, model_config)
    return model.to(device=device, dtype=dtype).eval()


def load_vae(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load the CogVideoX VAE from a diffusers `AutoencoderKLCogVideoX` folder (or a pipeline folder with
    vae/) or a cogvx-mega VAE checkpoint. Returns a `CogVideoXVAE` in eval mode:
    `encode(video [B,3,T,H,W] in [-1,1], sample=False) -> latents [B,16,T',H',W']` (before the latent scale,
    `model.config.scaling_factor`) and `decode(latents) -> video`; pass `group=` for context parallel."""
    from .tools.convert import read_diffusers_vae_folder, read_vae_checkpoint
    from .training.checkpoint import is_project_checkpoint
    from .vae import CogVideoXVAE

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
