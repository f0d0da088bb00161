"""Packing clips of different sizes and durations into fixed token budgets (`data.packing=true`).

The plan is a pure function of (the dataset's clips, seed, epoch, `data.pack_tokens`): in each epoch the
clips are put in a keyed random order (`order.KeyedPermutation`, nothing per clip held) and taken in windows
of `data.pack_window` clips; each window is packed best-fit-decreasing into packs of at most `pack_tokens`
tokens (text tokens counted), and its packs are put in a keyed random order. Every clip of the epoch lands in
exactly one pack. The packs of all epochs form one stream and step s trains on packs s*G .. s*G+G-1 (G =
`training.global_batch_size`, packs per step); data-parallel rank r takes a contiguous block of them. Finding
step s needs the pack counts of the windows before it: the plan keeps them as it goes and a checkpoint saves
them (`PackPlan.state_dict`), so a resume packs only the window it lands in.

A clip's global sample slot (what its noise, timestep, text dropout and posterior sample are keyed on) is
its position among the clips of the step, pack by pack, so explicit uniform sampling stratifies the
timesteps over the step's clips and each rank's clips draw from its own interval.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.order import ClipRange, KeyedPermutation, derive_key

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
    """The packs of every step, from a dataset's clips.

    `clips` with `clip_tokens` (ClipRef -> real tokens of the clip: text + video patches at its latent grid), or,
    for corpora of millions of clips, `PackPlan.of_groups` with clip ranges that share a token count (a bucket's
    clips all do). Nothing per clip is held: an epoch's order is a keyed permutation of the clips' positions
    (`order.KeyedPermutation`), a window of `window` positions is packed when a step first needs it, and the
    plan remembers the pack counts of the windows it has passed (a few integers per window, `state_dict`), so a
    run resumed from a checkpoint holding them finds step s without packing the epochs before it."""

    def __init__(self, clips: Sequence[ClipRef], clip_tokens: dict, pack_tokens: int, seed: int, window: int = 4096):
        groups: dict[tuple, list[int]] = {}
        for ref in clips:
            groups.setdefault((ref[0], clip_tokens[ref]), []).append(ref[1])
        self._init_groups([(bucket, ClipRange.of(indices), tokens) for (bucket, tokens), indices in groups.items()],
                          pack_tokens, seed, window)

    @classmethod
    def of_groups(cls, groups: Sequence[tuple[str, ClipRange, int]], pack_tokens: int, seed: int,
                  window: int = 4096) -> "PackPlan":
        """The plan of clips given as (bucket, its clips, tokens of each of them)."""
        plan = cls.__new__(cls)
        plan._init_groups(list(groups), pack_tokens, seed, window)
        return plan

    def _init_groups(self, groups: list, pack_tokens: int, seed: int, window: int) -> None:
        self.groups = sorted((g for g in groups if len(g[1])), key=lambda g: (g[0], g[2]))
        self.pack_tokens, self.seed, self.window = pack_tokens, seed, window
        too_long = [(bucket, tokens) for bucket, _, tokens in self.groups if tokens > pack_tokens]
        if too_long:
            bucket, tokens = max(too_long, key=lambda item: item[1])
            count = sum(len(g[1]) for g in self.groups if g[2] > pack_tokens)
            raise ConfigError("data.pack_tokens", pack_tokens,
                              f"{count} clips are longer (the longest, of bucket {bucket}, has {tokens} tokens with "
                              f"its text); raise data.pack_tokens to at least {tokens}")
        if not self.groups:
            raise ConfigError("data.packing", True, "the dataset holds no clip to pack")
        self.group_starts = np.cumsum([0] + [len(g[1]) for g in self.groups])
        self.clip_count = int(self.group_starts[-1])
        self.windows_per_epoch = -(-self.clip_count // window)
        self._windows: dict[tuple[int, int], list[Pack]] = {}  # (epoch, window) -> packs, the last few
        self._window_ends: dict[int, list[int]] = {}  # epoch -> cumulative pack count after each planned window
        self._epoch_starts = [0]  # stream position of each epoch's first pack, as far as known

    @property
    def fingerprint(self) -> str:
        """What the plan is a function of: the clips, tokens, budget, seed and window (a saved state must match)."""
        described = [(b, len(r), r.total, t) for b, r, t in self.groups]
        return derive_key("packs", described, self.pack_tokens, self.seed, self.window).to_bytes(8, "little").hex()

    def _refs(self, positions: np.ndarray) -> tuple[list, list[int]]:
        """(ClipRefs, tokens) of the clips at `positions` of the sorted groups."""
        numbers = np.searchsorted(self.group_starts, positions, side="right") - 1
        refs, sizes = [], []
        for number, position in zip(numbers.tolist(), positions.tolist()):
            bucket, clips, tokens = self.groups[number]
            refs.append((bucket, int(clips.select(position - int(self.group_starts[number])))))
            sizes.append(tokens)
        return refs, sizes

    def window_packs(self, epoch: int, window: int) -> list[Pack]:
        """The packs of one window of an epoch: its clips (positions window*W.. of the epoch's keyed permutation)
        packed best-fit-decreasing, in a keyed order."""
        key = (epoch, window)
        if key not in self._windows:
            order = KeyedPermutation(self.clip_count, derive_key("pack-order", self.seed, epoch))
            first = window * self.window
            refs, sizes = self._refs(order(np.arange(first, min(first + self.window, self.clip_count))))
            packs = [Pack(tuple(refs[i] for i in members), sum(sizes[i] for i in members))
                     for members in best_fit_decreasing(sizes, self.pack_tokens)]
            shuffle = KeyedPermutation(len(packs), derive_key("pack-shuffle", self.seed, epoch, window))
            self._windows[key] = [packs[i] for i in shuffle(np.arange(len(packs))).tolist()]
            while len(self._windows) > 4:  # a step reads one or two windows; keep memory bounded
                del self._windows[next(iter(self._windows))]
            ends = self._window_ends.setdefault(epoch, [])
            if window == len(ends):
                ends.append((ends[-1] if ends else 0) + len(packs))
        return self._windows[key]

    def epoch_packs(self, epoch: int) -> list[Pack]:
        """Every pack of an epoch, window after window (small datasets, tests and the bucket table)."""
        return [pack for window in range(self.windows_per_epoch) for pack in self.window_packs(epoch, window)]

    def _packs_in_epoch(self, epoch: int) -> int:
        ends = self._window_ends.setdefault(epoch, [])
        while len(ends) < self.windows_per_epoch:
            self.window_packs(epoch, len(ends))
        return ends[-1]

    def _locate(self, position: int) -> tuple[int, int, int]:
        """(epoch, window, index in the window) of stream position `position`."""
        while self._epoch_starts[-1] <= position:
            epoch = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + self._packs_in_epoch(epoch))
        epoch = bisect.bisect_right(self._epoch_starts, position) - 1
        offset = position - self._epoch_starts[epoch]
        ends = self._window_ends[epoch]
        window = bisect.bisect_right(ends, offset)
        return epoch, window, offset - (ends[window - 1] if window else 0)

    def step_packs(self, step: int, packs_per_step: int) -> list[Pack]:
        """The G packs of `step`, in slot order."""
        out = []
        for position in range(step * packs_per_step, (step + 1) * packs_per_step):
            epoch, window, index = self._locate(position)
            out.append(self.window_packs(epoch, window)[index])
        return out

    # --- resume ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint keeps so that a resume at any step needs no re-planning: the pack counts of the
        epochs passed and of the windows of the last two epochs planned (a few integers per window)."""
        recent = sorted(self._window_ends)[-2:]
        return {"fingerprint": self.fingerprint, "epoch_starts": list(self._epoch_starts),
                "window_ends": {str(e): list(self._window_ends[e]) for e in recent}}

    def load_state_dict(self, state: dict) -> bool:
        """Take the counts of a saved plan of the same clips and settings (False, and nothing taken, otherwise:
        the plan is then found by packing again, which gives the same packs)."""
        if not state or state.get("fingerprint") != self.fingerprint:
            return False
        if len(state["epoch_starts"]) > len(self._epoch_starts):
            self._epoch_starts = [int(v) for v in state["epoch_starts"]]
        for epoch, ends in state.get("window_ends", {}).items():
            if len(ends) > len(self._window_ends.get(int(epoch), [])):
                self._window_ends[int(epoch)] = [int(v) for v in ends]
        return True


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
        from cogvx_mega.model.packing import ClipShape, clip_tokens

        self.source = source
        self.model = model
        self.pack_tokens = pack_tokens
        bucket_grids = getattr(source, "bucket_grids", None)
        if bucket_grids is not None and hasattr(source, "usable"):  # a grid per bucket: nothing per clip held
            grids = bucket_grids()
            self.bucket_shapes = {b: ClipShape(*grid, model.max_text_seq_length) for b, grid in grids.items()}
            self.grids = None
            self.plan = PackPlan.of_groups([(b, clips, clip_tokens(model, self.bucket_shapes[b]))
                                            for b, clips in source.usable.items() if len(clips)],
                                           pack_tokens, seed, window)
        else:
            self.bucket_shapes = None
            self.grids = source.clip_table()
            self.shapes = {ref: ClipShape(*grid, model.max_text_seq_length) for ref, grid in self.grids.items()}
            self.plan = pack_plan(self.grids, model, pack_tokens, seed, window)

    def shape_of(self, ref):
        return self.bucket_shapes[ref[0]] if self.bucket_shapes is not None else self.shapes[ref]

    def state_dict(self) -> dict:
        return self.plan.state_dict()

    def load_state_dict(self, state: dict) -> bool:
        return self.plan.load_state_dict(state)

    def bucket_clips(self) -> dict[str, int]:
        """bucket -> clips of it in the packs (all of the source's)."""
        clips: dict[str, int] = {}
        for bucket, members, _ in self.plan.groups:
            clips[bucket] = clips.get(bucket, 0) + len(members)
        return clips

    def packs_per_epoch(self) -> int:
        """The packs of the first epoch (later epochs differ by a few at most: another shuffle)."""
        return len(self.plan.epoch_packs(0))

    @property
    def skipped(self):
        """The source's clips that could not be used (online mode: clips that failed to decode)."""
        return getattr(self.source, "skipped", {})

    def __len__(self) -> int:
        return self.plan.clip_count

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
                "clip_shapes_of_step": [[self.shape_of(ref) for ref in pack.clips] for pack in packs]}

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
