"""Packing clips of different sizes and durations into fixed token budgets (`data.packing=true`).

The plan is a pure function of (the dataset's clip table, seed, epoch, `data.pack_tokens`): in each epoch
the clips are shuffled (seeded by seed and epoch) and taken in windows of `data.pack_window` clips; each
window is packed best-fit-decreasing into packs of at most `pack_tokens` tokens (text tokens counted),
and the packs of the epoch are shuffled together. Every clip of the epoch lands in exactly one pack. The
packs of all epochs form one stream and step s trains on packs s*G .. s*G+G-1 (G =
`training.global_batch_size`, packs per step); data-parallel rank r takes a contiguous block of them.

A clip's global sample slot (what its noise, timestep, text dropout and posterior sample are keyed on) is
its position among the clips of the step, pack by pack, so explicit uniform sampling stratifies the
timesteps over the step's clips and each rank's clips draw from its own interval.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from cogvx_mega.config.errors import ConfigError

ClipRef = tuple  # (bucket name, clip index within the bucket): one clip of a dataset


def best_fit_decreasing(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of `sizes` in bins of total size <= budget: largest first, each into the bin it fills most
    tightly (a new bin when none has room). The same 11/9 worst-case bound as first-fit decreasing and at
    least as tight in practice; O(n log n) with the bins kept sorted by free room. Ties keep input order, so
    the result is deterministic."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room, bin) sorted
    for index in order:
        size = sizes[index]
        if size > budget:
            raise ValueError(f"a clip of {size} tokens does not fit data.pack_tokens={budget}")
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, chosen = free.pop(at)
        else:
            room, chosen = budget, len(bins)
            bins.append([])
        bins[chosen].append(index)
        bisect.insort(free, (room - size, chosen))
    return bins


@dataclass(frozen=True)
class Pack:
    clips: tuple
    """The `ClipRef`s of the pack, in pack order."""
    tokens: int
    """Real tokens of the pack (text and video of every clip)."""


class PackPlan:
    """The packs of every step, from a dataset's clip table.

    `clip_tokens`: ClipRef -> real tokens of the clip (text + video patches at its latent grid)."""

    def __init__(self, clips: Sequence[ClipRef], clip_tokens: dict, pack_tokens: int, seed: int, window: int = 4096):
        self.clips = sorted(clips)
        self.clip_tokens = clip_tokens
        self.pack_tokens = pack_tokens
        self.seed = seed
        self.window = window
        too_long = [(ref, clip_tokens[ref]) for ref in self.clips if clip_tokens[ref] > pack_tokens]
        if too_long:
            ref, tokens = max(too_long, key=lambda item: item[1])
            raise ConfigError("data.pack_tokens", pack_tokens,
                              f"{len(too_long)} clips are longer (the longest, {ref[0]} #{ref[1]}, has {tokens} "
                              f"tokens with its text); raise data.pack_tokens to at least {tokens}")
        if not self.clips:
            raise ConfigError("data.packing", True, "the dataset holds no clip to pack")
        self._epochs: dict[int, list[Pack]] = {}
        self._epoch_starts = [0]  # stream position of each planned epoch's first pack

    def epoch_packs(self, epoch: int) -> list[Pack]:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 1_000_033 + epoch)
            order = [self.clips[i] for i in torch.randperm(len(self.clips), generator=generator).tolist()]
            packs = []
            for start in range(0, len(order), self.window):
                window = order[start:start + self.window]
                sizes = [self.clip_tokens[ref] for ref in window]
                for members in best_fit_decreasing(sizes, self.pack_tokens):
                    packs.append(Pack(tuple(window[i] for i in members), sum(sizes[i] for i in members)))
            shuffle = torch.randperm(len(packs), generator=generator).tolist()
            self._epochs = {k: v for k, v in self._epochs.items() if k >= epoch - 1}  # keep memory bounded
            self._epochs[epoch] = [packs[i] for i in shuffle]
        return self._epochs[epoch]

    def _locate(self, position: int) -> tuple[int, int]:
        """(epoch, index in the epoch) of stream position `position`."""
        while self._epoch_starts[-1] <= position:
            epoch = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + len(self.epoch_packs(epoch)))
        epoch = bisect.bisect_right(self._epoch_starts, position) - 1
        return epoch, position - self._epoch_starts[epoch]

    def step_packs(self, step: int, packs_per_step: int) -> list[Pack]:
        """The G packs of `step`, in slot order."""
        out = []
        for position in range(step * packs_per_step, (step + 1) * packs_per_step):
            epoch, index = self._locate(position)
            out.append(self.epoch_packs(epoch)[index])
        return out


def pack_plan(grids: dict, model, pack_tokens: int, seed: int, window: int = 4096) -> PackPlan:
    """The PackPlan of clips with latent grids `grids` ({ClipRef: (T', H', W')}) for `model` (its text length
    and patch sizes give each clip's tokens)."""
    from cogvx_mega.model.packing import ClipShape, clip_tokens

    tokens = {ref: clip_tokens(model, ClipShape(*grid, model.max_text_seq_length)) for ref, grid in grids.items()}
    return PackPlan(list(grids), tokens, pack_tokens, seed, window)


def packing_efficiency(packs: Sequence[Pack], pack_tokens: int) -> float:
    """Useful tokens / budget: real tokens of the packs over len(packs) x pack_tokens."""
    return sum(p.tokens for p in packs) / (len(packs) * pack_tokens)


class PackedDataset:
    """`step_batch(step, slots, global_batch, seed)` in packs: slots and global_batch count packs.

    Returns {"packs": [{"latents": [T_i, C, H_i, W_i]..., "text_embeds": [L, D]..., "slots": [...]}...] for
    this rank's packs, "clips_in_step": clips of the whole step, "real_tokens", "pack_tokens",
    "clip_shapes_of_step"}. `source` is a dataset with `clip_table()` -> {ClipRef: (T', H', W')} and
    `read_clips(refs, slots, step, seed)` -> (latents list, text list)."""

    def __init__(self, source, model, pack_tokens: int, seed: int, window: int = 4096):
        from cogvx_mega.model.packing import ClipShape

        self.source = source
        self.model = model
        self.pack_tokens = pack_tokens
        self.grids = source.clip_table()
        self.shapes = {ref: ClipShape(*grid, model.max_text_seq_length) for ref, grid in self.grids.items()}
        self.plan = pack_plan(self.grids, model, pack_tokens, seed, window)

    def bucket_clips(self) -> dict[str, int]:
        """bucket -> clips of it in the packs (all of the source's)."""
        clips: dict[str, int] = {}
        for bucket, _ in self.grids:
            clips[bucket] = clips.get(bucket, 0) + 1
        return clips

    def packs_per_epoch(self) -> int:
        """The packs of the first epoch (later epochs differ by a few at most: another shuffle)."""
        return len(self.plan.epoch_packs(0))

    @property
    def skipped(self):
        """The source's clips that could not be used (online mode: clips that failed to decode)."""
        return getattr(self.source, "skipped", {})

    def __len__(self) -> int:
        return len(self.grids)

    def step_batch(self, step: int, slots: range, global_batch: int, seed: int) -> dict:
        packs = self.plan.step_packs(step, global_batch)
        first_slot = [0]
        for pack in packs:
            first_slot.append(first_slot[-1] + len(pack.clips))
        mine = []
        for index in slots:
            pack = packs[index]
            clip_slots = list(range(first_slot[index], first_slot[index + 1]))
            latents, texts = self.source.read_clips(list(pack.clips), clip_slots, step, seed)
            mine.append({"latents": latents, "text_embeds": texts, "slots": clip_slots})
        prefetch = getattr(self.source, "prefetch", None)
        if prefetch is not None:  # the next step's clips of these slots decode while this step trains
            following = self.plan.step_packs(step + 1, global_batch)
            prefetch([ref for index in slots for ref in following[index].clips])
        return {"packs": mine, "clips_in_step": first_slot[-1], "real_tokens": sum(p.tokens for p in packs),
                "pack_tokens": self.pack_tokens,
                "clip_shapes_of_step": [[self.shapes[ref] for ref in pack.clips] for pack in packs]}

    def close(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            close()


def packed_dataset_for(source, config) -> Optional[PackedDataset]:
    """The packed view of `source` when `data.packing` is on (None otherwise)."""
    data = config.data
    if not data.packing:
        return None
    if not hasattr(source, "clip_table"):
        raise ConfigError("data.packing", True, f"the {type(source).__name__} dataset cannot be packed; use a "
                                                f"latent cache, a manifest (online mode), synthetic data or a "
                                                f"latent folder")
    return PackedDataset(source, config.model, data.pack_tokens, config.training.seed, data.pack_window)


# A mixed training distribution at CogVideoX-5B scale (480x720 training, patch 2, 226 text tokens): latent
# grid (T', H', W') -> share of the clips. Videos of 49 frames in both orientations, 25- and 13-frame clips,
# 256px clips of the first progressive stage, and images (1-frame clips) at two sizes. The packer's tests
# and benchmarks/packing.py use it.
REFERENCE_MIX = {
    (13, 60, 90): 0.30,  # 49 x 480 x 720
    (13, 90, 60): 0.10,  # 49 x 720 x 480
    (7, 60, 90): 0.15,  # 25 x 480 x 720
    (4, 60, 90): 0.10,  # 13 x 480 x 720
    (13, 32, 32): 0.10,  # 49 x 256 x 256
    (1, 60, 90): 0.15,  # image 480 x 720
    (1, 96, 96): 0.10,  # image 768 x 768
}


def reference_mix_grids(count: int, seed: int = 0, spatial_divisor: int = 1) -> list[tuple[int, int, int]]:
    """`count` latent grids drawn from `REFERENCE_MIX` (spatial sizes divided by `spatial_divisor`, rounded to
    an even size, for runs that cannot afford the full scale)."""
    grids = list(REFERENCE_MIX)
    shares = torch.tensor([REFERENCE_MIX[g] for g in grids])
    picks = torch.multinomial(shares, count, replacement=True, generator=torch.Generator().manual_seed(seed))
    scaled = [(t, max(2, h // spatial_divisor // 2 * 2), max(2, w // spatial_divisor // 2 * 2)) for t, h, w in grids]
    return [scaled[i] for i in picks.tolist()]
