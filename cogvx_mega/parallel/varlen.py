"""Attention restricted to each clip of a packed sequence (block-diagonal attention), local backend.

A packed sequence is megatron's `thd` layout with batch size 1: clip i owns the span
[segments[i], segments[i+1]) of the sequence, its `lengths[i]` real tokens first and pad after (the pad
lets context parallel split every span into 2 x CP equal chunks, Transformer Engine's thd split). A
query of clip i attends to the real tokens of clip i only; pad queries attend to their clip's real keys
too and their outputs are ignored. The parameters travel as `PackedSequenceParams`, megatron's
`PackedSeqParams` (what TE's attention reads) plus the same boundaries as Python integers.

Kernels (`model.packed_attention`), all computing the same function:
- 'per_clip': one scaled_dot_product_attention per clip, no mask (flash / memory-efficient kernels on GPU);
- 'sdpa_mask': one scaled_dot_product_attention over the pack with a dense [t, t] block-diagonal mask;
- 'flex': torch flex_attention with a block-sparse mask (skips the blocks between clips);
- 'flash': flash-attn's varlen kernel (optional package, CUDA).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor

from cogvx_mega.parallel.context import (_AllToAll, _GatherSequence, _size_rank, inverse_permutation,
                                         rank_major_positions, segment_token_indices)

VARLEN_KERNELS = ("per_clip", "sdpa_mask", "flex", "flash")


@dataclasses.dataclass
class PackedSequenceParams(PackedSeqParams):
    """megatron's thd parameters (cu_seqlens over real tokens, cu_seqlens_*_padded over the spans) plus the
    host-side boundaries, so the attention never reads them back from the device."""

    segments: tuple = ()
    """[0, e_1, ..., total]: span boundaries (the padded cu_seqlens as integers)."""
    lengths: tuple = ()
    """Real tokens of each clip."""
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    """Index tensors built once per forward and shared by the layers."""

    @property
    def total(self) -> int:
        return self.segments[-1]


def packed_sequence_params(lengths: Sequence[int], segments: Sequence[int], device) -> PackedSequenceParams:
    """Parameters of a pack whose clip i has `lengths[i]` real tokens in span [segments[i], segments[i+1])."""
    lengths, segments = tuple(int(n) for n in lengths), tuple(int(n) for n in segments)
    if len(segments) != len(lengths) + 1 or any(n > stop - start for n, start, stop in
                                                zip(lengths, segments[:-1], segments[1:])):
        raise ValueError(f"packed clips of lengths {list(lengths)} do not fit the spans {list(segments)}")
    if any(n < 1 for n in lengths):
        raise ValueError(f"packed clips of lengths {list(lengths)}: every clip needs at least one token")
    cumulative = [0]
    for n in lengths:
        cumulative.append(cumulative[-1] + n)
    cu = torch.tensor(cumulative, dtype=torch.int32, device=device)
    cu_padded = torch.tensor(segments, dtype=torch.int32, device=device)
    longest = max(stop - start for start, stop in zip(segments[:-1], segments[1:]))
    return PackedSequenceParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                                cu_seqlens_kv_padded=cu_padded, max_seqlen_q=longest, max_seqlen_kv=longest,
                                segments=segments, lengths=lengths)


def check_packed_split(params: PackedSeqParams, cp_size: int) -> None:
    """Refuse a pack that context parallel would cut wrongly. TE's thd context parallel splits each sequence
    into 2 x CP chunks and silently drops the remainder of a span that is not a multiple of 2 x CP, or
    splits the unpadded lengths when `cu_seqlens_*_padded` is missing."""
    if cp_size == 1:
        return
    padded = params.cu_seqlens_q_padded
    if padded is None or params.cu_seqlens_kv_padded is None:
        raise ValueError("a packed sequence under context parallel needs cu_seqlens_q_padded/cu_seqlens_kv_padded "
                         "(each clip padded to a multiple of 2 x CP); refused rather than truncated")
    segments = getattr(params, "segments", None) or [int(n) for n in padded.tolist()]
    spans = [stop - start for start, stop in zip(segments[:-1], segments[1:])]
    if any(span % (2 * cp_size) for span in spans):
        raise ValueError(f"packed spans {spans}: context parallel CP={cp_size} needs every clip padded to a multiple "
                         f"of {2 * cp_size} tokens; refused rather than truncated (build the pack with "
                         f"cogvx_mega.model.packing.plan_pack_layout)")


# --- the kernels: queries grouped by clip (boundaries cu_q), keys grouped by clip (cu_k) ---------------------------

def _heads_first(x: Tensor) -> Tensor:
    return x.transpose(0, 1)[None]  # [t, H, d] -> [1, H, t, d]


def _tokens_first(x: Tensor) -> Tensor:
    return x[0].transpose(0, 1)  # [1, H, t, d] -> [t, H, d]


def _clip_ids(cu: Sequence[int], device) -> Tensor:
    sizes = torch.tensor([b - a for a, b in zip(cu[:-1], cu[1:])], device=device)
    return torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), sizes)


def _per_clip(q, k, v, cu_q, cu_k, scale):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    outs = [_tokens_first(sdpa(_heads_first(q[a:b]), _heads_first(k[c:d]), _heads_first(v[c:d]), scale=scale))
            for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])]
    return torch.cat(outs)


def _sdpa_mask(q, k, v, cu_q, cu_k, scale):
    mask = _clip_ids(cu_q, q.device)[:, None] == _clip_ids(cu_k, q.device)[None, :]
    out = torch.nn.functional.scaled_dot_product_attention(_heads_first(q), _heads_first(k), _heads_first(v),
                                                           attn_mask=mask[None, None], scale=scale)
    return _tokens_first(out)


def _flex(q, k, v, cu_q, cu_k, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("model.packed_attention=flex trains on CUDA only (torch's flex_attention has no CPU "
                           "backward); use model.packed_attention=per_clip on CPU")

    q_ids, k_ids = _clip_ids(cu_q, q.device), _clip_ids(cu_k, q.device)

    def same_clip(batch, head, q_index, k_index):
        return q_ids[q_index] == k_ids[k_index]

    block_mask = create_block_mask(same_clip, None, None, q.shape[0], k.shape[0], device=q.device)
    attend = _compiled_flex_attention() if q.is_cuda else flex_attention  # eager (unfused) off CUDA
    return _tokens_first(attend(_heads_first(q), _heads_first(k), _heads_first(v), block_mask=block_mask, scale=scale))


_COMPILED_FLEX = []


def _compiled_flex_attention():
    """flex_attention compiled once per process (its fused kernel exists only under torch.compile)."""
    if not _COMPILED_FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=True))
    return _COMPILED_FLEX[0]


def _flash(q, k, v, cu_q, cu_k, scale):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:  # pragma: no cover - optional CUDA package
        raise RuntimeError("model.packed_attention=flash needs the flash-attn package (CUDA): pip install flash-attn, "
                           "or use per_clip / sdpa_mask / flex") from error
    as_cu = lambda cu: torch.tensor(cu, dtype=torch.int32, device=q.device)  # noqa: E731
    longest = lambda cu: max(b - a for a, b in zip(cu[:-1], cu[1:]))  # noqa: E731
    return flash_attn_varlen_func(q, k, v, as_cu(cu_q), as_cu(cu_k), longest(cu_q), longest(cu_k), softmax_scale=scale)


_KERNELS = {"per_clip": _per_clip, "sdpa_mask": _sdpa_mask, "flex": _flex, "flash": _flash}


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Sequence[int], cu_k: Sequence[int], scale,
                     kernel: str) -> Tensor:
    """q [tq, H, d] grouped by clip at boundaries cu_q, k/v [tk, H, d] at cu_k -> [tq, H, d]: every query
    attends to the keys of its own clip."""
    try:
        run = _KERNELS[kernel]
    except KeyError:
        raise ValueError(f"model.packed_attention={kernel!r}: choose one of {', '.join(VARLEN_KERNELS)}") from None
    return run(q, k, v, list(cu_q), list(cu_k), scale)


# --- a pack on one rank or spread over the context-parallel group ------------------------------------------------

def _cached(params: PackedSequenceParams, key, build):
    if key not in params.cache:
        params.cache[key] = build()
    return params.cache[key]


def _natural_order(params, group, device) -> tuple[Tensor, Tensor]:
    """(order, inverse): rank-major position j holds natural token order[j]; natural t = rank-major inverse[t]."""
    def build():
        order = rank_major_positions(params.total, group, device, params.segments)
        return order, inverse_permutation(order)
    return _cached(params, ("order", device), build)


def _real_keys(params, device) -> tuple[Tensor, list[int]]:
    """Natural positions of the real tokens, clip by clip, and their boundaries."""
    def build():
        positions = torch.cat([torch.arange(start, start + n, device=device)
                               for start, n in zip(params.segments[:-1], params.lengths)])
        cu = [0]
        for n in params.lengths:
            cu.append(cu[-1] + n)
        return positions, cu
    return _cached(params, ("keys", device), build)


def packed_attention(query: Tensor, key: Tensor, value: Tensor, params: PackedSequenceParams, scale, kernel: str,
                     cp_group=None, cp_kind: Optional[str] = None) -> Tensor:
    """q/k/v [t_local, H, d] of this CP rank's share of the pack (TE's thd split) -> [t_local, H, d]."""
    size, _ = _size_rank(cp_group)
    device = query.device
    keys, cu_k = _real_keys(params, device)
    if size == 1:
        return varlen_attention(query, key.index_select(0, keys), value.index_select(0, keys), params.segments, cu_k,
                                scale, kernel)
    check_packed_split(params, size)
    order, inverse = _natural_order(params, cp_group, device)
    if cp_kind == "a2a":
        heads = query.shape[1]
        if heads % size:
            raise ValueError(f"Ulysses context parallel splits the {heads} attention heads of a tensor-parallel rank "
                             f"over CP={size}: use parallel.context_parallel_attention=all_gather, or a CP size "
                             f"dividing the heads per TP rank")
        q, k, v = (_AllToAll.apply(t, cp_group, 1, 0).index_select(0, inverse) for t in (query, key, value))
        out = varlen_attention(q, k.index_select(0, keys), v.index_select(0, keys), params.segments, cu_k, scale,
                               kernel)  # [t, H/cp, d] natural order
        return _AllToAll.apply(out.index_select(0, order), cp_group, 0, 1)
    if cp_kind == "all_gather":
        k, v = (_GatherSequence.apply(t, cp_group).index_select(0, inverse) for t in (key, value))
        local_segments = [boundary // size for boundary in params.segments]  # this rank's queries, clip by clip
        return varlen_attention(query, k.index_select(0, keys), v.index_select(0, keys), local_segments, cu_k, scale,
                                kernel)
    raise ValueError(f"parallel.context_parallel_attention={cp_kind!r}: packed sequences on the local backend "
                     f"support a2a and all_gather")


__all__ = ["VARLEN_KERNELS", "PackedSequenceParams", "packed_sequence_params", "check_packed_split",
           "varlen_attention", "packed_attention", "segment_token_indices"]
