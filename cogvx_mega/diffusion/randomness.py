"""Every random draw of a training step is keyed on (seed, global step, global sample slot, stream).

A step's global batch has G slots, 0..G-1; data-parallel rank r holds the contiguous slots
r*G/DP .. (r+1)*G/DP - 1, split into its micro-batches in order. Because nothing is keyed on a rank, the
same slot draws the same noise, timestep and text dropout at every layout and data-parallel size:
the layout changes speed, never results, and a resume at another size continues the same run.
"""
from __future__ import annotations

import enum
import hashlib
import struct
from typing import Sequence

import torch


class Stream(enum.IntEnum):
    """Independent random streams of one slot (a new kind of draw gets a new member, never a reused one)."""

    TIMESTEP = 1
    NOISE = 2
    TEXT_DROP = 3
    VAE_POSTERIOR = 4
    IMAGE_NOISE = 5
    """Image-to-video: the augmentation noise level and pixel noise of the first frame."""
    IMAGE_POSTERIOR = 6
    """Image-to-video: the VAE posterior draw of the noised first frame's latent."""
    IMAGE_DROP = 7
    """Image-to-video: whether the image conditioning is dropped (unconditional training)."""
    CAPTION_PICK = 8
    """data.caption_pick=random: which of a clip's captions it trains with at this use."""
    VAE_TRAINING_POSTERIOR = 9
    """VAE training: the posterior draw decoded for the clip."""
    VAE_TRAINING_LPIPS_FRAMES = 10
    """VAE training with loss.lpips_frames: which frames of the clip LPIPS compares."""
    VALID_TIMESTEP = 11
    """Validation: the timestep of a clip inside a timestep bin (the bin stands where the step does)."""
    VALID_NOISE = 12
    """Validation: the noise of a clip at a timestep bin."""


def slot_seed(seed: int, step: int, slot: int, stream: Stream) -> int:
    """A 63-bit seed from the key (a hash, so neighbouring keys give unrelated streams)."""
    key = struct.pack("<qqqq", seed, step, slot, int(stream))
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def slot_generator(seed: int, step: int, slot: int, stream: Stream) -> torch.Generator:
    """A CPU generator for one slot's draws of one stream."""
    return torch.Generator(device="cpu").manual_seed(slot_seed(seed, step, slot, stream))


def slot_normal(shape: Sequence[int], slots: Sequence[int], *, seed: int, step: int, stream: Stream) -> torch.Tensor:
    """[len(slots), *shape] standard normal draws, row i from slot slots[i]."""
    return torch.stack([torch.randn(tuple(shape), generator=slot_generator(seed, step, slot, stream))
                        for slot in slots])


def slot_uniform(slots: Sequence[int], *, seed: int, step: int, stream: Stream) -> torch.Tensor:
    """[len(slots)] uniform draws in [0, 1), one per slot."""
    return torch.cat([torch.rand(1, generator=slot_generator(seed, step, slot, stream)) for slot in slots])
