"""Data parallelism: megatron's DistributedDataParallel around each model chunk, the hooks its schedules call,
and the replicated parameters of pipeline stages kept in step."""
from __future__ import annotations

from typing import Callable

import torch

from cogvx_mega.config.schema import Config
from cogvx_mega.parallel import cpu_compat
from cogvx_mega.parallel.pipeline import finalize_gradients, mark_replicated_copies, synchronize_replicated_parameters


def wrap_data_parallel(model_chunks: list[torch.nn.Module], config: Config,
                       finalize: Callable = finalize_gradients) -> list[torch.nn.Module]:
    """megatron DDP per model chunk: gradients averaged over the data-parallel group into fp32 buffers. With
    bf16 parameters (`training.mixed_precision`) each chunk is first cast to bf16 in megatron's Float16Module,
    which also converts the first stage's inputs and returns the last stage's outputs in fp32. `finalize` is what
    the schedules call after the backward (`finalize_gradients`, or a variant that also sums LoRA factors).
    Installs megatron's hooks for overlapped communication, as its own training loop does."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    p = config.parallel
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
                                               overlap_param_gather=p.overlap_param_gather,
                                               use_distributed_optimizer=p.use_distributed_optimizer,
                                               bucket_size=p.ddp_bucket_size)
    wrapped = []
    bf16_params = config.training.precision() == "bf16_params"
    for index, chunk in enumerate(model_chunks):
        chunk.config.finalize_model_grads_func = finalize  # the schedules call it after backward
        module = chunk
        if bf16_params:
            chunk.config.bf16 = True
            chunk.config.pipeline_dtype = torch.bfloat16  # what pipeline stages send each other
            module = Float16Module(chunk.config, chunk)
        ddp = DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=module,
                                      disable_bucketing=index > 0)
        ddp.broadcast_params()  # every data-parallel replica starts from the first replica's weights
        wrapped.append(ddp)
    # megatron's hooks for overlapped communication (as its own training loop registers them)
    first = model_chunks[0].config
    pick = (lambda fns: fns[0] if len(fns) == 1 else fns)  # noqa: E731
    if p.overlap_grad_reduce:
        first.no_sync_func = pick([ddp.no_sync for ddp in wrapped])  # reduce once, after the last micro-batch
        first.grad_sync_func = pick([ddp.start_grad_sync for ddp in wrapped])
    if p.overlap_param_gather:
        first.param_sync_func = pick([ddp.start_param_sync for ddp in wrapped])
    synchronize_replicated_parameters(model_chunks)
    mark_replicated_copies(model_chunks)
    if cpu_compat.is_enabled():
        cpu_compat.fuse_weight_gradient_accumulation(model_chunks)
    return wrapped
