"""Where each clip's tokens sit in a packed sequence (`CogVideoXTransformer.forward_packed`).

A pack is one token sequence [text_1, video_1, pad_1, text_2, video_2, pad_2, ...] with batch size 1
(megatron's `thd` layout). Clip i owns the span [segments[i], segments[i+1]): its real tokens
(`lengths[i]` = text + video patches) and then its pad. Under context parallel every span is padded to a
multiple of 2 x CP, because CP splits each clip into 2 x CP chunks (Transformer Engine's thd split); the
last span also takes the pad that makes the whole pack split over CP x TP (sequence parallel), or reach a
fixed pack length. Pad tokens are never attended to and never enter the loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from cogvx_mega.config.model import ModelConfig


@dataclass(frozen=True)
class ClipShape:
    """One clip of a pack: its latent grid and its text length."""

    latent_frames: int
    latent_height: int
    latent_width: int
    text_length: int


def video_tokens(model: ModelConfig, latent_frames: int, latent_height: int, latent_width: int) -> int:
    """Patches of one clip's latents."""
    return (latent_frames // (model.patch_size_t or 1)) * (latent_height // model.patch_size) * (
        latent_width // model.patch_size)


def clip_tokens(model: ModelConfig, clip: ClipShape) -> int:
    """Real tokens of one clip in a pack: text plus video patches."""
    return clip.text_length + video_tokens(model, clip.latent_frames, clip.latent_height, clip.latent_width)


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


@dataclass(frozen=True)
class PackLayout:
    clips: tuple
    """The `ClipShape` of each clip, in pack order."""
    lengths: tuple
    """Real tokens of each clip."""
    segments: tuple
    """[0, e_1, ..., total]: clip i's span (real tokens then pad) is [segments[i], segments[i+1])."""

    @property
    def total(self) -> int:
        return self.segments[-1]

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)

    def condition_index(self, device=None) -> Tensor:
        """[total] int64, 2 x clip + is_text per position: the modulation row of every token (pad tokens take
        their clip's video row; their outputs are ignored)."""
        index = torch.empty(self.total, dtype=torch.long)
        for clip, (shape, start, stop) in enumerate(zip(self.clips, self.segments[:-1], self.segments[1:])):
            index[start:stop] = 2 * clip
            index[start:start + shape.text_length] = 2 * clip + 1
        return index.to(device)

    def video_mask(self, device=None) -> Tensor:
        """[total] bool: True on video tokens (the tokens with a loss)."""
        mask = torch.zeros(self.total, dtype=torch.bool)
        for shape, start, length in zip(self.clips, self.segments[:-1], self.lengths):
            mask[start + shape.text_length:start + length] = True
        return mask.to(device)

    def sequence_params(self, device=None):
        """megatron/TE thd parameters of this pack (`parallel.varlen.PackedSequenceParams`)."""
        from cogvx_mega.parallel.varlen import packed_sequence_params

        return packed_sequence_params(self.lengths, self.segments, device)


def plan_pack_layout(model: ModelConfig, clips: Sequence[ClipShape], transformer_config,
                     length: Optional[int] = None) -> PackLayout:
    """The layout of `clips` packed in this order at the model's parallel layout (`transformer_config`'s
    CP and sequence-parallel sizes). `length`: a fixed pack length (every pack of a step the same size, as
    pipeline parallel needs); it must hold the clips and split evenly."""
    from cogvx_mega.parallel.context import sequence_split_unit

    if not clips:
        raise ValueError("a pack needs at least one clip")
    cp = transformer_config.context_parallel_size
    clip_unit = 2 * cp if cp > 1 else 1
    unit = sequence_split_unit(transformer_config)
    lengths = tuple(clip_tokens(model, clip) for clip in clips)
    spans = [_round_up(n, clip_unit) for n in lengths]
    natural = _round_up(sum(spans), unit)
    if length is None:
        length = natural
    elif length < natural or length % unit:
        raise ValueError(f"a pack length of {length} tokens: these {len(clips)} clips need {natural} (padded for "
                         f"the parallel split) and the length must be a multiple of {unit}")
    spans[-1] += length - sum(spans)
    segments = [0]
    for span in spans:
        segments.append(segments[-1] + span)
    return PackLayout(tuple(clips), lengths, tuple(segments))


def padded_pack_length(model: ModelConfig, clips: Sequence[ClipShape], transformer_config) -> int:
    """The shortest length `plan_pack_layout` accepts for these clips."""
    return plan_pack_layout(model, clips, transformer_config).total
