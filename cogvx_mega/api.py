"""Public Python entry points."""
from __future__ import annotations

from typing import Optional

import torch


def from_pretrained(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, backend: str = "local",
                    verify: bool = True, weights: Optional[str] = None, **model_overrides):
    """Load a diffusers transformer (or pipeline) folder or a cogvx-mega checkpoint (single-file, or sharded
    at any training layout) into one whole model in this process.

    The model is called like diffusers' CogVideoXTransformer3DModel:
    `model(latents [B,T,C,H,W], text_embeds [B,L,D], timesteps [B]) -> v_pred [B,T,C_out,H,W]`.
    It works with or without torch.distributed, and inside a running job it leaves the job's process groups
    as they are (the model runs on this process alone). `model_overrides` set the model config fields that
    choose how it runs (`LOADER_MODEL_FIELDS`: e.g. `rope_impl="triton"`, `packed_attention="flex"`, or SAT's
    final-norm eps `output_norm_eps=1e-6`). A cogvx-mega
    checkpoint is verified first (every file's size and CRC32C; a damaged one is a ConfigError naming the file);
    `verify=False` reads it as it is.
    """
    from cogvx_mega.tools.load import load_transformer

    return load_transformer(path, device=device, dtype=dtype, backend=backend, verify=verify, weights=weights,
                            **model_overrides)


def load_vae(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, verify: bool = True):
    """Load the CogVideoX VAE from a diffusers `AutoencoderKLCogVideoX` folder (or a pipeline folder with
    vae/) or a cogvx-mega VAE checkpoint. Returns a `CogVideoXVAE` in eval mode:
    `encode(video [B,3,T,H,W] in [-1,1], sample=False) -> latents [B,16,T',H',W']` (before the latent scale,
    `model.config.scaling_factor`) and `decode(latents) -> video`; pass `group=` for context parallel."""
    from cogvx_mega.tools.load import load_vae as _load_vae

    return _load_vae(path, device=device, dtype=dtype, verify=verify)


def train(config, resume: str | None = None, init_from: str | None = None, init_lora: str | None = None,
          verify: bool = True) -> list[dict]:
    """Train a run as `cogvx train` does (in this process, or on every rank under torchrun): `config` from
    `cogvx_mega.config.load_config`; `resume` 'auto' or a checkpoint folder; `init_from` weights to start from
    (with a diffusers LoRA `init_lora` merged; verified first unless `verify=False`). Returns each step's metrics."""
    from cogvx_mega.run.training import run_training

    return run_training(config, resume=resume, init_from=init_from, init_lora=init_lora, verify=verify)
