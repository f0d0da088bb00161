"""Public Python entry points."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config.schema import ConfigError


def from_pretrained(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, backend: str = "local",
                    **model_overrides):
    """Load a diffusers transformer (or pipeline) folder or a cogvx-mega checkpoint (single-file, or sharded
    at any training layout) into one whole model in this process.

    The model is called like diffusers' CogVideoXTransformer3DModel:
    `model(latents [B,T,C,H,W], text_embeds [B,L,D], timesteps [B]) -> v_pred [B,T,C_out,H,W]`.
    It works with or without torch.distributed, and inside a running job it leaves the job's process groups
    as they are (the model runs on this process alone). `model_overrides` set the model config fields that
    choose how it runs (`RUNTIME_MODEL_FIELDS`: e.g. `rope_impl="triton"`, `packed_attention="flex"`).
    """
    from .checkpoint.reader import read_transformer_checkpoint
    from .checkpoint.transformer import load_project_state
    from .config.schema import RUNTIME_MODEL_FIELDS
    from .model.transformer import build_model

    if not Path(path).exists():
        raise ConfigError("path", str(path), "no such file or folder; pass a diffusers transformer folder or a "
                                             "cogvx-mega checkpoint folder")
    for name in model_overrides:
        if name not in RUNTIME_MODEL_FIELDS:
            raise ConfigError(name, model_overrides[name], f"from_pretrained overrides only the fields that choose "
                                                           f"how the model runs ({', '.join(RUNTIME_MODEL_FIELDS)}); "
                                                           f"the others describe the checkpoint's weights")
    model_config, state, _ = read_transformer_checkpoint(path)
    model_config = dataclasses.replace(model_config, backend=backend, **model_overrides)
    model_config.validate()
    model = build_model(model_config, device="cpu", params_dtype=torch.float32, run_device=device)
    load_project_state(model, state, model_config)
    return model.to(device=device, dtype=dtype).eval()


def load_vae(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load the CogVideoX VAE from a diffusers `AutoencoderKLCogVideoX` folder (or a pipeline folder with
    vae/) or a cogvx-mega VAE checkpoint. Returns a `CogVideoXVAE` in eval mode:
    `encode(video [B,3,T,H,W] in [-1,1], sample=False) -> latents [B,16,T',H',W']` (before the latent scale,
    `model.config.scaling_factor`) and `decode(latents) -> video`; pass `group=` for context parallel."""
    from .tools.load import load_vae as _load_vae

    return _load_vae(path, device=device, dtype=dtype)
