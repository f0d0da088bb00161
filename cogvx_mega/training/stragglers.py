"""The straggler report (`training.straggler_factor`): which ranks compute slower than the others.

Each rank times its own compute of every step: from the start of `train_step` (the batch in hand) to the moment
its gradients are ready for the data-parallel reduction, i.e. the entry of megatron's `finalize_model_grads`
(`config.finalize_model_grads_func`, which the trainer wraps with `ComputeTimer.wrap`), before the first wait
for every data-parallel replica. A slow rank therefore shows its own time, and the fast ranks, which wait for it
inside the reduction, do not look slow. On CUDA the two moments are CUDA events on the current stream (no extra
synchronisation; the elapsed time is read after the step's own synchronize), elsewhere `time.perf_counter`.

Every `training.log_interval` steps all ranks all-gather their mean compute time over the interval (one small
collective over the world, on the run's device: gloo on CPU, a CUDA tensor under NCCL), and the logging rank
warns about every rank slower than `straggler_factor` x the median (the lower middle value for an even count,
so that with two ranks the slow one is compared with the fast one), naming its node:
`straggler: rank 1 (node vm) 0.61 s/step of compute against the median 0.12 s (5.1x, training.straggler_factor=2)`.
The step's metrics row gets `compute_time_median`, `compute_time_max` (seconds) and `stragglers` (global ranks).

Under tensor or pipeline parallelism the ranks of a group wait for each other inside the forward and backward
(TP all-reduces, PP sends), so one slow rank makes its whole TP/PP group look slow: the report names the group
(its node), not always the single rank. The report only reads clocks and gathers them: losses and gradients are
the same with it on or off.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from cogvx_mega.training.watchdog import node_name

logger = logging.getLogger(__name__)


class ComputeTimer:
    """This rank's compute time per step (see the module), summed over the current log interval."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._started = None  # a perf_counter reading or a CUDA event
        self._ready = None
        self.total = 0.0
        self.steps = 0

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def step_started(self) -> None:
        self._started, self._ready = self._mark(), None

    def gradients_ready(self) -> None:
        """The first call of a step counts (megatron calls finalize once a step)."""
        if self._started is not None and self._ready is None:
            self._ready = self._mark()

    def step_finished(self) -> None:
        """After the step's synchronize: add its compute time to the interval (a step without a reading, e.g. a
        schedule that did not finalize, is left out)."""
        if self._started is not None and self._ready is not None:
            if self.cuda:
                self.total += self._started.elapsed_time(self._ready) / 1000.0
            else:
                self.total += self._ready - self._started
            self.steps += 1
        self._started = self._ready = None

    def take_mean(self) -> float:
        """The mean compute time per step of the interval (0 without readings); starts a new interval."""
        mean = self.total / self.steps if self.steps else 0.0
        self.total, self.steps = 0.0, 0
        return mean

    def wrap(self, finalize: Callable) -> Callable:
        """`finalize` (what megatron's schedules call once the backward is done) that first notes the moment."""
        def finalize_timed(*args, **kwargs):
            self.gradients_ready()
            return finalize(*args, **kwargs)

        return finalize_timed


class StragglerReport:
    """Every log interval: gather every rank's mean compute time, name the ranks slower than `factor` x the
    median (logging rank), and return the metrics row's fields."""

    def __init__(self, factor: float, device: torch.device, is_logging_rank: bool,
                 setting: str = "training.straggler_factor"):
        self.factor = factor
        self.device = device
        self.is_logging_rank = is_logging_rank
        self.setting = setting
        self.timer = ComputeTimer(device)
        self._nodes: Optional[list[str]] = None

    def report(self) -> dict:
        """Collective (every rank calls it at the same step): {compute_time_median, compute_time_max, stragglers}."""
        times = self._gather(self.timer.take_mean())
        median = statistics.median_low(times)
        stragglers = [rank for rank, seconds in enumerate(times) if median > 0 and seconds > self.factor * median]
        if stragglers:
            nodes = self._node_names()  # every rank sees the same times, so every rank takes part
            if self.is_logging_rank:
                for rank in stragglers:
                    logger.warning("straggler: rank %d (node %s) %.2f s/step of compute against the median %.2f s "
                                   "(%.1fx, %s=%g)", rank, nodes[rank], times[rank], median, times[rank] / median,
                                   self.setting, self.factor)
        return {"compute_time_median": median, "compute_time_max": max(times), "stragglers": stragglers}

    def _gather(self, mean: float) -> list[float]:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return [mean]
        local = torch.tensor([mean], dtype=torch.float64, device=self.device)
        every = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(every, local)
        return [float(t.item()) for t in every]

    def _node_names(self) -> list[str]:
        """Every rank's node, gathered once (the first time a straggler is named)."""
        if self._nodes is None:
            if dist.is_initialized() and dist.get_world_size() > 1:
                names: list = [None] * dist.get_world_size()
                dist.all_gather_object(names, node_name())
                self._nodes = names
            else:
                self._nodes = [node_name()]
        return self._nodes
