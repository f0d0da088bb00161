"""Pipeline-parallel glue: model chunks per stage, and the conditioning replicated on every stage.

The timestep (and ofs) embedding feeds the modulations of every layer, so each pipeline stage and
each virtual chunk holds a copy. The copies start equal, their gradients are summed over all copies
(chunks on this rank, then the pipeline group) after the data-parallel reduction, so they stay equal.
Only the first copy counts in the gradient norm (the others are marked `shared`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

REPLICATED_MODULES = ("time_embedding", "ofs_embedding")


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
        chunk = getattr(chunk, "module", chunk)  # unwrap DDP
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


def reduce_replicated_gradients(model_chunks) -> None:
    """Sum the conditioning gradients over all copies (this rank's chunks, then the pipeline group)."""
    from megatron.core import parallel_state

    groups = replicated_parameters(model_chunks)
    if not groups or not groups[0]:
        return
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if len(groups) == 1 and pp_size == 1:
        return
    grads = [[getattr(p, "main_grad", p.grad) for p in params] for params in groups]
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
