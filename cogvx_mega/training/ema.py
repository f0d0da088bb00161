"""An exponential moving average of the weights (`training.ema_decay`, `training.ema_start_step`), kept sharded
exactly like the parameters: each rank averages the parameters of its own chunks (its tensor- and pipeline-
parallel shard; data- and context-parallel replicas hold the same values), one fp32 copy of that shard and
nothing more, never a gathered model.

After optimizer step s (s = 1, 2, ...): before `ema_start_step` the average is the weights themselves; from it on
    ema_s = decay * ema_{s-1} + (1 - decay) * w_s.
Skipped steps (no update) leave it as it is. A LoRA run averages its adapters only (the frozen base needs none).

Checkpoints hold it beside the model as sharded tensors named `ema.<the parameter's global name>` with the
parameter's own sharding metadata, so it reloads at any layout like the model does (`sharded_state`, `load`),
and a reader in one process takes `ema.`-prefixed names (`checkpoint.sharded.read_sharded_model_state`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from cogvx_mega.checkpoint.sharded import EMA_PREFIX, model_sharded_state
from cogvx_mega.parallel.pipeline import unwrap_model


class WeightAverage:
    def __init__(self, model_chunks, decay: float, start_step: int = 0, keep: Optional[Callable[[str], bool]] = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay}: use a decay in (0, 1), e.g. 0.9999")
        self.decay, self.start_step, self.keep = decay, start_step, keep
        self.model_chunks = list(model_chunks)
        self.chunks = [unwrap_model(chunk) for chunk in self.model_chunks]
        # per chunk: parameter name -> (the parameter, its fp32 average)
        self.averages: list[dict[str, tuple[torch.nn.Parameter, torch.Tensor]]] = [
            {name: (param, param.detach().float().clone()) for name, param in chunk.named_parameters()
             if keep is None or keep(name)} for chunk in self.chunks]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based: the number of steps done)."""
        pairs = [(param.detach(), average) for averages in self.averages for param, average in averages.values()]
        if not pairs:
            return
        params = [param if param.dtype == average.dtype else param.float() for param, average in pairs]
        targets = [average for _, average in pairs]
        if step <= self.start_step:
            torch._foreach_copy_(targets, params)
        else:  # ema + (1 - decay) * (w - ema), every tensor in one multi-tensor call
            torch._foreach_lerp_(targets, params, 1.0 - self.decay)

    @torch.no_grad()
    def reset_to_weights(self) -> None:
        """Start the average at the current weights (a resumed run whose checkpoint has no average)."""
        for averages in self.averages:
            for param, average in averages.values():
                average.copy_(param)

    def memory_bytes(self) -> int:
        return sum(a.numel() * a.element_size() for averages in self.averages for _, a in averages.values())

    def sharded_state(self) -> dict:
        """{'ema': ...} (one chunk) or {'ema0': ..., 'ema1': ...}: the averages as ShardedTensors with each
        parameter's sharding metadata, keyed `ema.<global name>`."""
        model_state = model_sharded_state(self.model_chunks, self.keep)
        out = {}
        for (model_key, chunk_state), averages in zip(model_state.items(), self.averages):
            by_storage = {param.data_ptr(): average for param, average in averages.values()}
            tensors = {}
            for name, sharded in chunk_state.items():
                if not isinstance(sharded, ShardedTensor) or sharded.data.data_ptr() not in by_storage:
                    continue
                average = by_storage[sharded.data.data_ptr()]
                tensors[name] = dataclasses.replace(sharded, key=EMA_PREFIX + sharded.key, data=average,
                                                    dtype=average.dtype)
            out[model_key.replace("model", "ema", 1)] = tensors
        return out

    @torch.no_grad()
    def load(self, loaded: dict) -> None:
        """Copy the loaded averages (`dist_checkpointing.load` of `sharded_state()`) into place."""
        for key, state in self.sharded_state().items():
            for name, tensor in loaded[key].items():
                if state[name].data is not tensor:  # loaded into a new tensor, not in place
                    state[name].data.copy_(tensor)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averages in place of the weights for the block (validation, samples of the EMA); the weights are
        put back after, bit for bit."""
        saved = []
        with torch.no_grad():
            for averages in self.averages:
                for param, average in averages.values():
                    saved.append(param.detach().clone())
                    param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                index = 0
                for averages in self.averages:
                    for param, _ in averages.values():
                        param.copy_(saved[index])
                        index += 1
