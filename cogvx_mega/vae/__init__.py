"""The CogVideoX 3D causal VAE with whole-clip, chunked and context-parallel (time-split) execution."""
from cogvx_mega.vae.config import VAEConfig, vae_config_from_diffusers, vae_config_to_diffusers, vae_preset
from cogvx_mega.vae.model import CogVideoXVAE
from cogvx_mega.vae.time_split import VAEInputError

__all__ = ["CogVideoXVAE", "VAEInputError", "VAEConfig", "vae_config_from_diffusers", "vae_config_to_diffusers", "vae_preset"]
