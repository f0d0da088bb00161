"""LoRA on the transformer's tensor-parallel linears (`finetune.lora_rank`), megatron-style.

An adapted linear computes y = x W^T + b + s * (x A^T) B^T with s = alpha / rank, A [r, in] and B [out, r];
B starts at zero, so the adapted model starts as the base model. The base weights are frozen: they get no
gradient, no DDP gradient buffer and no optimizer state; only A and B train.

Each factor is sharded like the dimension of W it touches:
- column-parallel linears (QKV, FFN in; W split on `out`): B [out/tp, r] is split like W's rows, A is whole
  on every TP rank. The LoRA branch runs on the same input tensor as the base GEMM, after the layer's own
  input collective (the identity/all-reduce pair without sequence parallel, all-gather/reduce-scatter with
  it), so the backward's one input-gradient collective carries both paths.
- row-parallel linears (attention out, FFN out; W split on `in`): A [r, in/tp] is split like W's columns, B is
  whole. Each rank adds its partial (x_shard A_shard^T) B^T to its partial base output before the layer's own
  all-reduce (reduce-scatter with sequence parallel), which sums both.
So the adapters add no collective to the forward or to the activation gradients. The whole factor (A of a
column-parallel linear, B of a row-parallel one) gets a partial gradient on each TP rank; those gradients are
summed over the TP group in one coalesced all-reduce per step (`reduce_lora_gradients`), as megatron sums the
gradients of sequence-parallel norms.

The linears are megatron's own modules with two more parameters (`<linear>.lora_A`, `<linear>.lora_B`): the
base weights keep their names, so base checkpoints load before the adapters are added, and the adapters'
checkpoint keys are `decoder.layers.{i}.<path>.lora_A|B` at every layout. The local backend only (the te
backend's linears run TE's fused GEMMs, which this forward does not call).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.training import FinetuneConfig
from cogvx_mega.diffusion.randomness import slot_seed

# LoRA target -> the linear's path inside a layer, and whether it is column parallel
LORA_MODULE_PATHS = {"linear_qkv": ("self_attention.linear_qkv", True),
                     "linear_proj": ("self_attention.linear_proj", False),
                     "linear_fc1": ("mlp.linear_fc1", True),
                     "linear_fc2": ("mlp.linear_fc2", False)}
_TARGET_STREAM = {"linear_qkv": 101, "linear_proj": 102, "linear_fc1": 103, "linear_fc2": 104}


def is_lora_parameter(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B") or name in ("lora_A", "lora_B")


class _LoRAMixin:
    """The adapter parameters and branch shared by the column- and row-parallel forms."""

    lora_scale: float
    lora_dropout: nn.Module

    def _lora(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.lora_scale

    def _lora_sharded_state_dict(self, prefix, sharded_offsets, metadata, axes: dict):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, axes, sharded_offsets, tp_group=self.tp_group,
                                                   dp_cp_group=(metadata or {}).get("dp_cp_group"))


def _column_class():
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region,
                                                        gather_from_tensor_model_parallel_region)

    class LoRAColumnParallelLinear(_LoRAMixin, ColumnParallelLinear):
        def forward(self, input_: Tensor, weight: Optional[Tensor] = None, runtime_gather_output=None):
            if self.sequence_parallel:  # the layer's own: all-gather forward, reduce-scatter backward
                total = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True,
                                                             group=self.tp_group)
            else:  # identity forward, all-reduce of the input gradient backward
                total = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
            bias = self.bias if not self.skip_bias_add else None
            output = F.linear(total, self.weight if weight is None else weight, bias) + self._lora(total)
            gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
            if gather:
                output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
            return output, (self.bias if self.skip_bias_add else None)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return self._lora_sharded_state_dict(prefix, sharded_offsets, metadata,
                                                 {"weight": 0, "bias": 0, "lora_B": 0})

    return LoRAColumnParallelLinear


def _row_class():
    from megatron.core.tensor_parallel.layers import RowParallelLinear
    from megatron.core.tensor_parallel.mappings import (reduce_from_tensor_model_parallel_region,
                                                        reduce_scatter_to_sequence_parallel_region,
                                                        scatter_to_tensor_model_parallel_region)

    class LoRARowParallelLinear(_LoRAMixin, RowParallelLinear):
        def forward(self, input_: Tensor):
            x = input_ if self.input_is_parallel else scatter_to_tensor_model_parallel_region(input_,
                                                                                             group=self.tp_group)
            partial = F.linear(x, self.weight) + self._lora(x)  # both summed by the layer's own reduction
            if self.sequence_parallel:
                output = reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
            else:
                output = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
            if self.skip_bias_add:
                return output, self.bias
            return (output + self.bias if self.bias is not None else output), None

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return self._lora_sharded_state_dict(prefix, sharded_offsets, metadata, {"weight": 1, "lora_A": 1})

    return LoRARowParallelLinear


_CLASSES: dict = {}


def _adapted_class(column: bool) -> type:
    if column not in _CLASSES:
        _CLASSES[column] = _column_class() if column else _row_class()
    return _CLASSES[column]


@torch.no_grad()
def _add_adapter(linear: nn.Module, column: bool, finetune: FinetuneConfig, seed: int, layer_number: int,
                 target: str) -> None:
    """Turn a megatron Column/RowParallelLinear into its LoRA form in place (its class and two parameters)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    from megatron.core.utils import get_pg_rank, get_pg_size

    tp_size, tp_rank = get_pg_size(linear.tp_group), get_pg_rank(linear.tp_group)
    weight = linear.weight
    rank = finetune.lora_rank
    full_in = weight.shape[1] if column else weight.shape[1] * tp_size
    # A of the whole model, drawn from (seed, layer, target) alone so every layout starts from the same adapters
    # (PEFT's kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))); B = 0
    generator = torch.Generator().manual_seed(slot_seed(seed, layer_number, 0, _TARGET_STREAM[target]))
    bound = 1.0 / math.sqrt(full_in)
    a_full = (torch.rand(rank, full_in, generator=generator) * 2 - 1) * bound
    lora_a = a_full if column else a_full.chunk(tp_size, dim=1)[tp_rank].clone()
    lora_b = torch.zeros(weight.shape[0], rank)  # [out/tp, r] for column, [out, r] for row parallel
    linear.__class__ = _adapted_class(column)
    linear.lora_A = nn.Parameter(lora_a.to(device=weight.device, dtype=weight.dtype))
    linear.lora_B = nn.Parameter(lora_b.to(device=weight.device, dtype=weight.dtype))
    linear.lora_scale = finetune.lora_scale
    linear.lora_dropout = nn.Dropout(finetune.lora_dropout) if finetune.lora_dropout else nn.Identity()
    sharded, whole = (linear.lora_B, linear.lora_A) if column else (linear.lora_A, linear.lora_B)
    set_tensor_model_parallel_attributes(sharded, True, 0 if column else 1, 1)
    whole.lora_tp_partial_grad = tp_size > 1  # summed over TP by reduce_lora_gradients
    for param in (linear.lora_A, linear.lora_B):
        param.sequence_parallel = False  # megatron's SP norm reduction must not sum them a second time


def apply_lora(model_chunks, finetune: FinetuneConfig, seed: int) -> int:
    """Add the adapters of `finetune` to this rank's chunks (after their base weights are loaded, before they
    are wrapped for training) and freeze everything else; returns the number of adapted linears."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from cogvx_mega.parallel.pipeline import unwrap_model

    adapted = 0
    for chunk in model_chunks:
        chunk = unwrap_model(chunk)
        if chunk.model_config.backend != "local":
            raise ConfigError("finetune.lora_rank", finetune.lora_rank, "LoRA runs on the local backend's linears: "
                                                                        "use model.backend=local")
        for param in chunk.parameters():
            param.requires_grad_(False)
        for layer in chunk.decoder.layers:
            for target in finetune.lora_targets:
                path, column = LORA_MODULE_PATHS[target]
                linear = layer.get_submodule(path)
                expected = ColumnParallelLinear if column else RowParallelLinear
                if type(linear) is not expected:
                    raise ConfigError("finetune.lora_targets", target, f"{path} is a {type(linear).__name__}, not "
                                                                       f"megatron's {expected.__name__}")
                _add_adapter(linear, column, finetune, seed, layer.layer_number, target)
                adapted += 1
    return adapted


def lora_parameters(model_chunks) -> list[nn.Parameter]:
    from cogvx_mega.parallel.pipeline import unwrap_model

    return [param for chunk in model_chunks for name, param in unwrap_model(chunk).named_parameters()
            if is_lora_parameter(name)]


def reduce_lora_gradients(model_chunks) -> None:
    """Sum the whole factors' partial gradients over the tensor-parallel group (one coalesced all-reduce)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    params = [p for p in lora_parameters(model_chunks) if getattr(p, "lora_tp_partial_grad", False)
              and p.requires_grad]
    grads = [getattr(p, "main_grad", p.grad) for p in params]
    grads = [g for g in grads if g is not None]
    if not grads:
        return
    coalesced = _flatten_dense_tensors(grads)
    dist.all_reduce(coalesced, group=parallel_state.get_tensor_model_parallel_group())
    for grad, synced in zip(grads, _unflatten_dense_tensors(coalesced, grads)):
        grad.copy_(synced)
