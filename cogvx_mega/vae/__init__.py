"""The CogVideoX 3D causal VAE with whole-clip, chunked and context-parallel (time-split) execution."""
from .config import VAEConfig, vae_config_from_diffusers, vae_config_to_diffusers, vae_preset
from .model import CogVideoXVAE

__all__ = ["CogVideoXVAE", "VAEConfig", "vae_config_from_diffusers", "vae_config_to_diffusers", "vae_preset"]
