"""Let megatron-core 0.16.1 run on a CPU-only torch build (gloo), so one code path serves laptops, CI and GPUs.

Applied once per process by `enable()`, and only when the run's device is CPU (training, the CPU test
tier). It makes the whole process CPU-only, also on a machine with GPUs: `torch.cuda.is_available()` then
answers False and CUDA is never initialised. Nothing that merely builds or reads a model needs it
(`from_pretrained`, the converters and `cogvx vae` run without it). What it covers (see
../shared/notes/megatron-core-on-cpu.md for the findings behind it):

- the model-parallel RNG tracker calls `torch.cuda.{get,set}_rng_state` and `manual_seed`: on CPU
  these map to the CPU generator;
- `torch.cuda.current_device()`, `synchronize`, streams and events are used as plain bookkeeping
  in p2p, DDP and checkpoint code: they become CPU no-ops;
- function bodies create tensors with `device="cuda"` or call `.cuda()`: a process-wide
  `TorchFunctionMode` rewrites CUDA devices to CPU on factory calls and `Tensor.to/.cuda`;
- the optimizer asserts `tensor.type() == 'torch.cuda.FloatTensor'`: a bare `type()` answers
  with the CUDA name of the CPU type;
- the torch_dist checkpoint writer's spawn-context Manager queue becomes a fork-context queue;
- megatron's weight-gradient accumulation fusion (apex's `fused_weight_gradient_mlp_cuda` on GPUs) gets a torch
  implementation, one GEMM that adds into the DDP gradient buffer (`fuse_weight_gradient_accumulation`);
- glibc's malloc keeps freed tensor memory for reuse (`keep_freed_memory`): a GPU has torch's caching
  allocator, a CPU has plain malloc, which hands large freed blocks back to the kernel, so the next step
  faults every page in again.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ENABLED = False
_MODE: "CudaToCpuMode | None" = None
_CHECKPOINT_MANAGER = None


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, int):
        return True  # megatron passes torch.cuda.current_device() (an int) as a device
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


_REWRITTEN_METHODS = frozenset({torch.Tensor.type, torch.Tensor.cuda, torch.Tensor.pin_memory, torch.Tensor.to})


class CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA device arguments to CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call of the process passes here: the common case (no device to rewrite) is one set lookup
        # and one dictionary test before the call.
        if func in _REWRITTEN_METHODS:
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                # megatron's optimizer and grad-norm code compare type() with 'torch.cuda.*Tensor' strings
                return func(*args).replace("torch.", "torch.cuda.", 1)
            if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
                return args[0]
            if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], bool) and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
        if not kwargs:
            return func(*args)
        if _is_cuda_device(kwargs.get("device")) or kwargs.get("pin_memory"):
            kwargs = dict(kwargs)
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            if kwargs.get("pin_memory"):
                kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _patch_cuda_namespace() -> None:
    cuda = torch.cuda
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state  # megatron reaches it through torch.cuda.random
    cuda.random.set_rng_state = cuda.set_rng_state
    # megatron seeds and snapshots "the CUDA generator"; on CPU that is the CPU generator
    # (the RNG tracker restores the previous state after each add/fork, as on GPU).
    # (torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    # megatron passes current_device() as the `device` of allocations, also inside autograd backward,
    # where torch-function modes are not active: answer with the CPU device itself.
    cuda.current_device = lambda: torch.device("cpu")
    cuda.device_count = lambda: 0
    cuda.is_available = lambda: False  # the process is CPU-only from here on, GPUs present or not
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.set_device = lambda device: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0


def _patch_megatron() -> None:
    # The RNG tracker holds CPU generator states; megatron's fork() swaps them with
    # torch.cuda.{get,set}_rng_state, which now act on the CPU generator.
    from megatron.core.tensor_parallel import random as mp_random

    def _get_cuda_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state, device=-1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = _get_cuda_rng_state
    mp_random._set_cuda_rng_state = _set_cuda_rng_state

    # The torch_dist writer collects results from forked writer processes through a queue that megatron
    # creates with a spawn-context Manager (a fresh interpreter per rank: seconds on 2 cores, and it fails
    # under forked test ranks). A fork-context Manager serves the same synchronous queue at once.
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def _fork_results_queue():
        global _CHECKPOINT_MANAGER
        if filesystem_async._results_queue is None:
            _CHECKPOINT_MANAGER = multiprocessing.get_context("fork").Manager()
            filesystem_async._results_queue = _CHECKPOINT_MANAGER.Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = _fork_results_queue

    from megatron.core.tensor_parallel import layers

    layers.fused_weight_gradient_mlp_cuda = WeightGradientAccumulation
    layers._grad_accum_fusion_available = True


class WeightGradientAccumulation:
    """apex's `fused_weight_gradient_mlp_cuda` in torch, for megatron's linears on the CPU: main_grad [out, in] +=
    grad_output [tokens, out]^T @ input [tokens, in] as one GEMM that accumulates in place, instead of a weight
    gradient tensor that DDP's hook then adds into the buffer and frees."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        if grad_output.dtype == main_grad.dtype:
            main_grad.addmm_(grad_output.t(), total_input)
        else:  # bf16 activations, fp32 buffer
            main_grad.add_(grad_output.t().mm(total_input))

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def fuse_weight_gradient_accumulation(model_chunks) -> int:
    """Turn on megatron's weight-gradient accumulation fusion in the tensor-parallel linears whose weights have a
    DDP gradient buffer (`main_grad`), as Megatron-LM runs on GPUs; returns how many. Only after the DDP wrap: a
    linear without a buffer (a model used outside training, a frozen LoRA base) keeps the plain path."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    fused = 0
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and hasattr(module.weight, "main_grad"):
                module.gradient_accumulation_fusion = True
                fused += 1
    return fused


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep what a training step frees for the next step (False where the C library is not
    glibc; nothing changes there).

    By default glibc serves blocks above a threshold with their own mmap and returns the heap's free top to the
    kernel once it passes twice that threshold. Under megatron's DDP a step holds no tensor across its end (weight
    gradients go straight into the preallocated buffer), so the activations' memory is handed back at the end of
    every step and page-faulted in again in the next: on the 2-core CI machine about 10,000 faults a step at
    CogVideoX-5B width and 1,216 tokens, about 8% of the step. Allocations of up to 32 MiB (glibc's largest mmap
    threshold) now come from the heap, and up to 1 GiB of free heap top stays mapped (the process keeps its
    peak, as torch's CUDA caching allocator does on a GPU)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def enable() -> None:
    """Apply the CPU compatibility layer (idempotent): this process runs megatron on the CPU from now on.

    Never call it in a process that also uses CUDA (a GPU job, a notebook holding GPU tensors): it turns
    torch.cuda into CPU stand-ins for the rest of the process."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    if torch.cuda.is_initialized():
        raise RuntimeError("cpu_compat.enable(): CUDA is already in use in this process; a CPU run needs a process "
                           "of its own (e.g. `cogvx train --device cpu`)")
    _patch_cuda_namespace()
    _patch_megatron()
    keep_freed_memory()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True
    logger.debug("megatron-core CPU compatibility layer enabled")


def release_checkpoint_queue() -> None:
    """Stop the checkpoint writer's queue server (a process that exits via os._exit must call this)."""
    global _CHECKPOINT_MANAGER
    if _CHECKPOINT_MANAGER is not None:
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        _CHECKPOINT_MANAGER.shutdown()
        _CHECKPOINT_MANAGER = None
        filesystem_async._results_queue = None


def is_enabled() -> bool:
    return _ENABLED
