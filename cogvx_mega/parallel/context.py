"""Context parallel for the 3D full attention over the joint [text ; video] sequence (local backend).

The sequence is split over the CP group in megatron's load-balanced order (rank r holds chunks r and
2cp-1-r of 2cp equal chunks); megatron slices RoPE tables the same way. Attention has no mask, so
the order of keys does not matter and gathered keys need no reordering. Two ways to attend:

- 'a2a' (Ulysses): all-to-all turns [s/cp, heads] into [s, heads/cp], full attention per head group,
  and all-to-all back. Needs the heads of a TP rank divisible by CP.
- 'all_gather': every rank gathers K and V of the whole sequence and attends with its own queries.
  Works for any head count; K/V memory grows to the whole sequence.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

CP_ATTENTION_KINDS = ("a2a", "all_gather")


def _size_rank(group) -> tuple[int, int]:
    """Size and rank of a process group; (1, 0) for None (a model built for one process)."""
    from megatron.core.utils import get_pg_rank, get_pg_size

    return get_pg_size(group), get_pg_rank(group)


def padded_sequence_length(seq_length: int, config) -> int:
    """The sequence length after padding to a multiple of 2 x CP (x TP under sequence parallel).

    Sequences that do not split evenly are padded at the end; the pad tokens are masked out of every
    attention as keys and out of the loss, so the result equals the unpadded computation."""
    unit = sequence_split_unit(config)
    return -(-seq_length // unit) * unit


def sequence_split_unit(config) -> int:
    """The sequence length must be a multiple of this to split over CP (load-balanced) and SP, and, with FP8,
    for every CP rank's tokens (the GEMMs' rows) to be a multiple of 16, as TE's FP8 GEMMs need."""
    import math

    cp = config.context_parallel_size
    unit = (2 * cp if cp > 1 else 1) * (config.tensor_model_parallel_size if config.sequence_parallel else 1)
    if getattr(config, "fp8", None):
        unit = math.lcm(unit, 16 * cp)
    return unit


def local_token_indices(seq_length: int, cp_size: int, cp_rank: int, device=None) -> Tensor:
    """Positions of this CP rank's tokens: chunks r and 2cp-1-r of 2cp equal chunks."""
    chunk = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


def segment_token_indices(seq_length: int, cp_size: int, cp_rank: int, segments=None, device=None) -> Tensor:
    """Positions of this CP rank's tokens. Without `segments` the whole sequence is split load-balanced
    (`local_token_indices`); with `segments` (boundaries [0, e_1, ..., seq_length] of a packed sequence,
    each span a multiple of 2 x CP) every span is split that way on its own and the rank's pieces are
    concatenated span by span: Transformer Engine's split of a `thd` packed sequence."""
    if segments is None:
        return local_token_indices(seq_length, cp_size, cp_rank, device)
    if segments[0] != 0 or segments[-1] != seq_length:
        raise ValueError(f"packed segments {list(segments)} do not cover the sequence of {seq_length} tokens")
    if cp_size == 1:
        return torch.arange(seq_length, device=device)
    spans = [stop - start for start, stop in zip(segments[:-1], segments[1:])]
    if any(span % (2 * cp_size) for span in spans):
        raise ValueError(f"packed spans {spans}: context parallel splits every span into 2 x CP={2 * cp_size} equal "
                         f"chunks, so each must be padded to a multiple of {2 * cp_size} (refused rather than "
                         f"truncated)")
    return torch.cat([start + local_token_indices(stop - start, cp_size, cp_rank, device)
                      for start, stop in zip(segments[:-1], segments[1:])])


def split_sequence(tensor: Tensor, seq_length: int, group, segments=None) -> Tensor:
    """This CP rank's tokens of a [s, ...] tensor (differentiable; identity without CP). `group`: the CP group;
    `segments`: the span boundaries of a packed sequence (`segment_token_indices`)."""
    size, rank = _size_rank(group)
    if size == 1:
        return tensor
    return tensor.index_select(0, segment_token_indices(seq_length, size, rank, segments, tensor.device))


def _all_gather_dim0(tensor: Tensor, group) -> Tensor:
    size = dist.get_world_size(group)
    out = torch.empty((size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
    return out


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradient of this rank's slice over the group."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        return _all_gather_dim0(tensor, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":  # each rank receives only the sum of its own slice
            out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter: the same sum, then this rank's slice
        return grad.chunk(size, dim=0)[rank].contiguous(), None


class _AllToAll(torch.autograd.Function):
    """Send chunk j of `scatter_dim` to rank j, receive each rank's chunk stacked along `gather_dim`."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(tensor, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def _all_to_all(tensor: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    size = dist.get_world_size(group)
    inputs = [t.contiguous() for t in tensor.chunk(size, dim=scatter_dim)]
    outputs = [torch.empty_like(t) for t in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


def gather_sequence(tensor: Tensor, seq_length: int, group, segments=None) -> Tensor:
    """Inverse of `split_sequence`: every rank gets the whole [s, ...] tensor in natural order."""
    size, _ = _size_rank(group)
    if size == 1:
        return tensor
    gathered = _GatherSequence.apply(tensor, group)  # rank-major, each rank's chunks in its own order
    order = rank_major_positions(seq_length, group, tensor.device, segments)
    return gathered.index_select(0, inverse_permutation(order))


def inverse_permutation(order: Tensor) -> Tensor:
    """inverse[order[j]] = j: where each natural position sits in `order`."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def rank_major_positions(seq_length: int, group, device=None, segments=None) -> Tensor:
    """Sequence positions in the order the CP ranks hold them, concatenated rank by rank: the order of
    gathered keys (all_gather) and of the sequence after Ulysses' all-to-all. Natural order at CP=1."""
    size, _ = _size_rank(group)
    return torch.cat([segment_token_indices(seq_length, size, r, segments, device) for r in range(size)])


def sdpa(q: Tensor, k: Tensor, v: Tensor, scale, key_valid: Tensor | None = None) -> Tensor:
    """[s, b, h, d] x3 -> [s, b, h, d]; key_valid [s_k] bool masks padded keys out."""
    mask = None if key_valid is None else key_valid[None, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), attn_mask=mask, scale=scale)
    return out.permute(2, 0, 1, 3)


def context_parallel_attention(query: Tensor, key: Tensor, value: Tensor, kind: str, scale,
                               key_valid: Tensor | None, group) -> Tensor:
    """q/k/v [s/cp, b, heads, d] of this CP rank -> attention output [s/cp, b, heads, d].

    key_valid [s] marks the real (non-pad) keys in rank-major order (`rank_major_positions`), the order
    in which both kinds see the keys; the model builds it once per forward. `group`: the CP group."""
    size, _ = _size_rank(group)
    if kind == "a2a":
        heads = query.shape[2]
        if heads % size:
            raise ValueError(f"Ulysses context parallel splits the {heads} attention heads of a tensor-parallel rank "
                             f"over CP={size}: use parallel.context_parallel_attention=all_gather, or a CP size "
                             f"dividing the heads per TP rank")
        q, k, v = (_AllToAll.apply(t, group, 2, 0) for t in (query, key, value))  # [s, b, heads/cp, d]
        return _AllToAll.apply(sdpa(q, k, v, scale, key_valid), group, 0, 2)  # [s/cp, b, heads, d]
    if kind == "all_gather":
        k, v = (_GatherSequence.apply(t, group) for t in (key, value))  # [s, b, heads, d]
        return sdpa(query, k, v, scale, key_valid)
    raise ValueError(f"parallel.context_parallel_attention={kind!r}: choose one of {', '.join(CP_ATTENTION_KINDS)}")
