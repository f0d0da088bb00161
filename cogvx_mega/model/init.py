"""Layout-independent weight initialisation.

Each parameter is drawn in full from a generator keyed on (seed, its global name), then cut to this
rank's tensor-parallel shard. The weights of a run therefore do not depend on TP, PP, VPP, CP or DP:
every layout starts from exactly the same model, which is what lets a layout be compared with one
process and a checkpoint move between layouts.
"""
from __future__ import annotations

import re
import zlib

import torch

INIT_STD = 0.02
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_parameter_name(chunk: torch.nn.Module, name: str) -> str:
    """`decoder.layers.{local}.x` of a pipeline chunk -> `decoder.layers.{global}.x`."""
    match = _LAYER.match(name)
    if not match:
        return name
    layer = chunk.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + name[match.end():]


def _full_value(global_name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    leaf = global_name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape)
    if len(shape) == 1:  # norm weights
        return torch.ones(shape)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(global_name.encode())) % (2**63 - 1))
    return torch.randn(shape, generator=generator) * INIT_STD


@torch.no_grad()
def initialize_weights(model_chunks, seed: int) -> None:
    """Overwrite every parameter (except learned position tables, which keep their sin-cos start)."""
    from megatron.core.utils import get_pg_rank, get_pg_size

    for chunk in model_chunks:
        tp_size, tp_rank = get_pg_size(chunk.tp_group), get_pg_rank(chunk.tp_group)
        for name, param in chunk.named_parameters():
            if name.endswith("pos_embedding"):
                continue
            shape = list(param.shape)
            sharded = getattr(param, "tensor_model_parallel", False) and tp_size > 1
            if sharded:
                shape[param.partition_dim] *= tp_size
            full = _full_value(global_parameter_name(chunk, name), torch.Size(shape), seed)
            if sharded:
                full = full.chunk(tp_size, dim=param.partition_dim)[tp_rank]
            param.copy_(full.to(param.dtype))
