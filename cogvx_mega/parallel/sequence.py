"""Sequence-parallel glue: split the [s, b, h] token sequence over the tensor-parallel group and gather it back.

All functions are identities when `config.sequence_parallel` is off, so the model calls them unconditionally.
`group` is the tensor-parallel group the model was built with.
"""
from __future__ import annotations

import torch
from torch import Tensor


def scatter_tokens(hidden: Tensor, config, group) -> Tensor:
    """[s, b, h] -> this TP rank's [s/tp, b, h] (backward: all-gather)."""
    if not config.sequence_parallel:
        return hidden
    from megatron.core import tensor_parallel

    return tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=group)


def local_tokens(tensor: Tensor, config, group) -> Tensor:
    """This TP rank's rows of a non-differentiable per-token tensor (e.g. the text-token mask)."""
    if not config.sequence_parallel:
        return tensor
    from megatron.core.utils import get_pg_rank, get_pg_size

    size, rank = get_pg_size(group), get_pg_rank(group)
    chunk = tensor.shape[0] // size
    return tensor[rank * chunk:(rank + 1) * chunk]


def gather_tokens(hidden: Tensor, config, group) -> Tensor:
    """[s/tp, b, h] -> [s, b, h]. Backward keeps this rank's slice (the consumers are replicated per rank)."""
    if not config.sequence_parallel:
        return hidden
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=group)


def mark_sequence_parallel(module: torch.nn.Module, config) -> None:
    """Parameters applied per token on a sequence shard: their gradients are summed over the TP group."""
    for param in module.parameters():
        param.sequence_parallel = bool(config.sequence_parallel)
