"""The v-prediction loss in token space, on this context-parallel rank's tokens.

Each CP rank returns its share of the global mean (sum of its squared errors / all elements of the
batch); megatron multiplies by CP and the DP x CP gradient average then gives exactly the gradient
of the global mean. Without CP this is the plain mean over every video element.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..model.transformer import patchify
from ..parallel.context import split_sequence


def target_tokens(target: Tensor, text_length: int, patch_size: int, patch_size_t) -> tuple[Tensor, Tensor]:
    """[B, T, C, H, W] -> (this CP rank's target tokens [s/cp, b, F], video-token mask [s/cp])."""
    tokens = patchify(target, patch_size, patch_size_t or 1)  # [b, N, F]
    b, n, f = tokens.shape
    full = torch.cat([tokens.new_zeros(b, text_length, f), tokens], dim=1).transpose(0, 1)  # [s, b, F]
    is_video = torch.arange(text_length + n, device=target.device) >= text_length
    return split_sequence(full, text_length + n), split_sequence(is_video, text_length + n)


def v_prediction_token_loss(prediction_tokens: Tensor, target: Tensor, text_length: int, patch_size: int,
                            patch_size_t) -> Tensor:
    tokens, is_video = target_tokens(target, text_length, patch_size, patch_size_t)
    squared = (prediction_tokens.float() - tokens.float()) ** 2 * is_video[:, None, None]
    return squared.sum() / target.numel()
