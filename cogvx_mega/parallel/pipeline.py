"""Pipeline-parallel glue: model chunks per stage, and the conditioning replicated on every stage.

The timestep (and ofs) embedding feeds the modulations of every layer, so each pipeline stage and
each virtual chunk holds a copy. The copies start equal, their gradients are summed over all copies
(chunks on this rank, then the pipeline group) after the data-parallel reduction, so they stay equal.
Only the first copy counts in the gradient norm (the others are marked `shared`).

With the distributed optimizer the data-parallel reduction is a reduce-scatter: afterwards a rank holds
the reduced gradient only on its own shard of each bucket, and the shards fall at different offsets of
the conditioning on different stages. The copies' gradients are therefore first made whole on every
data-parallel rank (each rank contributes its own shard, zeros elsewhere, summed over the reduce-scatter
group) and only then summed over the copies.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

REPLICATED_MODULES = ("time_embedding", "ofs_embedding")


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside megatron's wrappers (DDP, Float16Module)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def build_model_chunks(build_chunk: Callable[..., torch.nn.Module]) -> list[torch.nn.Module]:
    """One model per virtual stage of this pipeline rank: build_chunk(pre_process, post_process, vp_stage)."""
    from megatron.core import parallel_state

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None or vpp == 1:
        return [build_chunk(parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage(), None)]
    return [build_chunk(parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                        parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage), stage)
            for stage in range(vpp)]


def replicated_parameters(model_chunks) -> list[list[torch.nn.Parameter]]:
    """The conditioning parameters of each chunk, in the same order for every chunk."""
    groups = []
    for chunk in model_chunks:
        chunk = unwrap_model(chunk)
        params = []
        for name in REPLICATED_MODULES:
            module = getattr(chunk, name, None)
            if module is not None:
                params.extend(module.parameters())
        groups.append(params)
    return groups


def mark_replicated_copies(model_chunks) -> None:
    """Count the conditioning once in the gradient norm: every copy but the first stage's first chunk is `shared`."""
    from megatron.core import parallel_state

    first_rank = parallel_state.get_pipeline_model_parallel_rank() == 0
    for index, params in enumerate(replicated_parameters(model_chunks)):
        for param in params:
            param.shared = not (first_rank and index == 0)


@torch.no_grad()
def synchronize_replicated_parameters(model_chunks) -> None:
    """Make every copy equal to the first stage's first chunk."""
    from megatron.core import parallel_state

    groups = replicated_parameters(model_chunks)
    for params in groups[1:]:
        for target, source in zip(params, groups[0]):
            target.copy_(source)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        source_rank = dist.get_global_rank(group, 0)
        for params in groups:
            for param in params:
                dist.broadcast(param.data, src=source_rank, group=group)


def _reduce_scatter_shards(ddp_chunk) -> dict:
    """param -> (reduce-scatter group, [(start, stop)] of its flattened elements this rank owns), for the
    parameters of a megatron DDP chunk with the distributed optimizer (empty otherwise)."""
    if not getattr(getattr(ddp_chunk, "ddp_config", None), "use_distributed_optimizer", False):
        return {}
    location = {}
    for buffer in ddp_chunk.buffers:
        location.update(buffer.param_index_map)  # param -> (start, end, bucket) in the buffer
    owned = {}
    for bucket_group in ddp_chunk.bucket_groups:
        size = bucket_group.intra_distributed_optimizer_instance_size
        rank = bucket_group.intra_distributed_optimizer_instance_rank
        for bucket in bucket_group.buckets:
            shard = bucket.grad_data.numel() // size
            low, high = bucket.offset + rank * shard, bucket.offset + (rank + 1) * shard  # buffer coordinates
            for param in bucket.params_list:
                start, end, _ = location[param]
                first, last = max(start, low), min(end, high)
                ranges = [(first - start, last - start)] if first < last else []
                owned[param] = (bucket_group.intra_distributed_optimizer_instance_group, ranges)
    return owned


def _whole_after_reduce_scatter(grad: torch.Tensor, group, ranges: list) -> None:
    """In place: the data-parallel reduced gradient everywhere, from each rank's own reduced shard."""
    mine = torch.zeros_like(grad).reshape(-1)
    for start, stop in ranges:
        mine[start:stop] = grad.reshape(-1)[start:stop]
    dist.all_reduce(mine, group=group)
    grad.copy_(mine.view_as(grad))


def reduce_replicated_gradients(model_chunks) -> None:
    """Sum the conditioning gradients over all copies (this rank's chunks, then the pipeline group)."""
    from megatron.core import parallel_state

    groups = [[p for p in params if p.requires_grad] for params in replicated_parameters(model_chunks)]
    if not groups or not groups[0]:  # none, or frozen (LoRA fine-tuning)
        return
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if len(groups) == 1 and pp_size == 1:
        return
    grads = [[getattr(p, "main_grad", p.grad) for p in params] for params in groups]
    for chunk, params, chunk_grads in zip(model_chunks, groups, grads):
        shards = _reduce_scatter_shards(chunk)
        for param, grad in zip(params, chunk_grads):
            if param in shards:
                _whole_after_reduce_scatter(grad, *shards[param])
    total = torch.cat([g.reshape(-1) for g in grads[0]]).clone()
    for chunk_grads in grads[1:]:
        total += torch.cat([g.reshape(-1) for g in chunk_grads])
    if pp_size > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    for chunk_grads in grads:
        offset = 0
        for grad in chunk_grads:
            grad.copy_(total[offset: offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def finalize_gradients(model_chunks, num_tokens: Optional[torch.Tensor] = None, **kwargs) -> None:
    """megatron's finalize_model_grads (DP, SP and TP reductions), then the replicated conditioning."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model_chunks, num_tokens, **kwargs)
    reduce_replicated_gradients(model_chunks)
