"""Process groups: torch.distributed and megatron's model-parallel state, built from one ParallelConfig.

`initialize_parallel` is the only function that creates process groups. It works for one process
(a laptop, a notebook, `from_pretrained`) and under torchrun, on CPU (gloo) and GPU (NCCL).
"""
from __future__ import annotations

import datetime
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from cogvx_mega.config.parallel import ParallelConfig
from cogvx_mega.parallel import cpu_compat

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelDims:
    """Where this process sits in the layout."""

    world_size: int
    rank: int
    data_parallel_size: int
    data_parallel_rank: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    context_parallel_size: int

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def init_torch_distributed(device: str) -> None:
    """The default process group (NCCL on CUDA, gloo on CPU): from torchrun's environment, or a private
    single-process store."""
    if dist.is_initialized():
        return
    backend = "nccl" if device == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=30 if device == "cuda" else 5)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        init_private_world(backend, timeout)


def init_private_world(backend: str = "gloo", timeout: datetime.timedelta = datetime.timedelta(minutes=5)) -> None:
    """torch.distributed as a world of this one process, on a private file store (nothing listens on a port)."""
    store_file = tempfile.NamedTemporaryFile(prefix="cogvx-pg-", delete=False)
    store_file.close()
    store = dist.FileStore(store_file.name, 1)
    dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)


# the layout (TP, PP, CP, VPP, hierarchical CP) megatron's current groups were built for
_BUILT_LAYOUT: Optional[tuple] = None


def initialize_parallel(parallel: Optional[ParallelConfig] = None, device: str = "cpu",
                        seed: int = 1234) -> ParallelDims:
    """Create (or reuse) the process groups for `parallel` and seed megatron's RNG tracker."""
    from megatron.core import parallel_state, tensor_parallel

    parallel = parallel or ParallelConfig()
    if device == "cpu":
        cpu_compat.enable()
    init_torch_distributed(device)
    world_size = dist.get_world_size()
    data_parallel_size = parallel.data_parallel_size(world_size)
    global _BUILT_LAYOUT
    wanted = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
              parallel.context_parallel_size, parallel.virtual_pipeline_model_parallel_size,
              parallel.hierarchical_context_parallel_sizes)
    if parallel_state.model_parallel_is_initialized() and _BUILT_LAYOUT != wanted:
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            hierarchical_context_parallel_sizes=parallel.hierarchical_context_parallel_sizes,
        )
        _BUILT_LAYOUT = wanted
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return ParallelDims(
        world_size=world_size,
        rank=dist.get_rank(),
        data_parallel_size=data_parallel_size,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
    )


# the groups a model names: megatron's ProcessGroupCollection fields the model's modules read
_MODEL_GROUPS = ("tp", "pp", "cp", "tp_cp", "mp", "hcp")
_OWN_GROUP = None  # this process alone (a size-1 group), for single-process models inside a running job


def model_parallel_groups():
    """megatron's current model-parallel groups (after `initialize_parallel`), for a model built at this layout."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=list(_MODEL_GROUPS))


def single_process_groups():
    """Groups for a model that runs whole in this process (`from_pretrained`, the tools).

    Inside a job (torch.distributed initialized) it is a group of this process alone, created with local
    synchronization: no other rank takes part and every existing group stays as it is. Without
    torch.distributed, megatron's layers still want a group object, so a private one-process world is
    started on a file store (no port, no other process; `init_private_world`)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    global _OWN_GROUP
    if not dist.is_initialized():
        init_private_world()
    if _OWN_GROUP is None:
        _OWN_GROUP = (dist.group.WORLD if dist.get_world_size() == 1
                      else dist.new_group([dist.get_rank()], use_local_synchronization=True))
    groups = ProcessGroupCollection()
    for name in _MODEL_GROUPS:
        setattr(groups, name, None if name == "hcp" else _OWN_GROUP)
    return groups


def data_parallel_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def shutdown() -> None:
    """Tear down process groups (tests and the end of `cogvx train`)."""
    from megatron.core import parallel_state

    global _BUILT_LAYOUT, _OWN_GROUP
    _BUILT_LAYOUT, _OWN_GROUP = None, None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
