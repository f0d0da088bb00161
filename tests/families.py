"""Tiny diffusers CogVideoX configs for every preset family (the parity oracle), shared by the tests."""
from __future__ import annotations

import torch

_BASE = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, time_embed_dim=24, text_embed_dim=12,
             max_text_seq_length=5, sample_frames=9, sample_height=8, sample_width=12, in_channels=4, out_channels=4)

FAMILIES = {
    # 2B: Conv2d patches, 3D sin-cos absolute positions
    "sincos-2b": dict(_BASE, use_rotary_positional_embeddings=False),
    # 5B: 3D RoPE
    "rope-5b": dict(_BASE, use_rotary_positional_embeddings=True),
    # 5B-I2V: 32-channel style input (noisy ‖ image latent) + learned positions
    "i2v-5b": dict(_BASE, in_channels=8, use_rotary_positional_embeddings=True,
                   use_learned_positional_embeddings=True),
    # 1.5: p_t = 2 Linear patches, no conv bias
    "v15-5b": dict(_BASE, patch_size_t=2, patch_bias=False, use_rotary_positional_embeddings=True),
    # 1.5-I2V: p_t = 2, 2x channels and the ofs embedding
    "v15-i2v": dict(_BASE, patch_size_t=2, patch_bias=False, in_channels=8, ofs_embed_dim=24,
                    use_rotary_positional_embeddings=True),
}


def make_diffusers_model(family: str, seed: int = 0, std: float = 0.3):
    """Random weights: matrices and biases N(0, std), norms N(0, 1). std 0.3 gives outputs of magnitude ~30,
    which makes every tensor matter; a smaller std gives outputs nearer the O(1) of a trained model."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**FAMILIES[family]).eval()
    with torch.no_grad():  # randomise every tensor (diffusers zero-inits some) so each one matters
        for name, param in model.named_parameters():
            param.normal_(0.0, std if "norm" not in name else 1.0)
        if FAMILIES[family].get("use_learned_positional_embeddings"):
            model.patch_embed.pos_embedding.normal_(0.0, 0.5)
    return model


# The `tiny` preset's transformer as a diffusers model (8 layers, 4 heads of 16, RoPE): a released
# checkpoint stand-in that `--init-from` loads at any layout.
TINY_PRESET = dict(num_attention_heads=4, attention_head_dim=16, num_layers=8, time_embed_dim=32, text_embed_dim=32,
                   max_text_seq_length=16, sample_frames=9, sample_height=8, sample_width=8, in_channels=4,
                   out_channels=4, use_rotary_positional_embeddings=True)


def make_tiny_preset_diffusers_model(seed: int = 0):
    """Random weights on the scale training would give (matrices std 0.05, norms near 1), so a training
    step from them is well-behaved and every tensor matters."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**TINY_PRESET).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.copy_(1.0 + 0.1 * torch.randn_like(param)) if name.endswith("weight") else param.normal_(0, 0.1)
            else:
                param.normal_(0.0, 0.05)
    return model


def pipeline_rope(reference, latent_frames: int, latent_height: int, latent_width: int):
    """RoPE tables exactly as diffusers' CogVideoX pipelines build them for this transformer."""
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    if not reference.config.use_rotary_positional_embeddings:
        return None
    pipeline = CogVideoXPipeline.__new__(CogVideoXPipeline)  # only the position helper is used
    pipeline.__dict__.update(transformer=reference, vae_scale_factor_spatial=8)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(
        pipeline, latent_height * 8, latent_width * 8, latent_frames, torch.device("cpu"))
