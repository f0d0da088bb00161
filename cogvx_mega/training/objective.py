"""The v-prediction loss in token space, on this context-parallel rank's tokens.

Each CP rank returns its share of the global mean (sum of its squared errors / all elements of the
batch); megatron multiplies by CP and the DP x CP gradient average then gives exactly the gradient
of the global mean. Without CP this is the plain mean over every video element.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cogvx_mega.model.transformer import patchify
from cogvx_mega.parallel.context import split_sequence


def target_tokens(target: Tensor, text_length: int, patch_size: int, patch_size_t,
                  padded_length: int, cp_group) -> tuple[Tensor, Tensor]:
    """[B, T, C, H, W] -> (this CP rank's target tokens [S/cp, b, F], video-token mask [S/cp]) over the
    padded [text ; video ; pad] sequence."""
    tokens = patchify(target, patch_size, patch_size_t or 1)  # [b, N, F]
    b, n, f = tokens.shape
    pad = padded_length - text_length - n
    full = torch.cat([tokens.new_zeros(b, text_length, f), tokens, tokens.new_zeros(b, pad, f)], dim=1)
    positions = torch.arange(padded_length, device=target.device)
    is_video = (positions >= text_length) & (positions < text_length + n)
    return (split_sequence(full.transpose(0, 1), padded_length, cp_group),
            split_sequence(is_video, padded_length, cp_group))


def v_prediction_token_loss(prediction_tokens: Tensor, target: Tensor, text_length: int, patch_size: int,
                            patch_size_t, padded_length: int, cp_group) -> Tensor:
    tokens, is_video = target_tokens(target, text_length, patch_size, patch_size_t, padded_length, cp_group)
    squared = (prediction_tokens.float() - tokens.float()) ** 2 * is_video[:, None, None]
    return squared.sum() / target.numel()


def packed_v_prediction_loss(prediction_tokens: Tensor, targets: list, layout, patch_size: int, patch_size_t,
                             cp_group) -> Tensor:
    """Sum over the clips of a pack of each clip's v-MSE (mean over its own elements), on this CP rank's
    tokens: prediction_tokens [t/cp, 1, F] in the pack order of `layout` (a `model.packing.PackLayout`),
    targets[i] [T_i, C, H_i, W_i]. The CP ranks' shares add up to the pack's sum."""
    pieces, weights = [], []
    for target, shape, start, stop, length in zip(targets, layout.clips, layout.segments[:-1], layout.segments[1:],
                                                  layout.lengths):
        tokens = patchify(target[None], patch_size, patch_size_t or 1)[0]  # [N_i, F]
        piece = tokens.new_zeros(stop - start, tokens.shape[1])
        piece[shape.text_length:length] = tokens
        weight = torch.zeros(stop - start, dtype=torch.float32, device=target.device)
        weight[shape.text_length:length] = 1.0 / target.numel()
        pieces.append(piece)
        weights.append(weight)
    full = split_sequence(torch.cat(pieces)[:, None], layout.total, cp_group, layout.segments)  # [t/cp, 1, F]
    weight = split_sequence(torch.cat(weights), layout.total, cp_group, layout.segments)
    return ((prediction_tokens.float() - full.float()) ** 2 * weight[:, None, None]).sum()
