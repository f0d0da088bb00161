"""Measured peak memory of tiny training layouts against the planner's prediction (tools/plan.estimate_memory).

    .venv/bin/python benchmarks/memory_peaks.py            # CPU, gloo ranks forked here

Each layout runs on its own ranks; the measured peak is the largest over ranks of the allocator's live bytes
(tools/plan.measure_peak_memory). tests/distributed/test_planner_memory.py asserts the same within 15%.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "distributed"))

# (name, ranks, overrides): 17-frame 128x128 clips, 336 tokens a sample, two samples a micro-batch
BASE = ["data.num_frames=17", "data.height=128", "data.width=128", "data.num_synthetic_clips=8",
        "training.micro_batch_size=2", "training.run_dir=/tmp/cogvx-memory-peaks"]
LAYOUTS = [
    ("one process", 1, []),
    ("full recompute", 1, ["training.recompute=full"]),
    ("TP2 + SP", 2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    ("PP2, 2 micro-batches", 2, ["parallel.pipeline_model_parallel_size=2", "training.global_batch_size=4"]),
    ("PP2 + full recompute", 2, ["parallel.pipeline_model_parallel_size=2", "training.global_batch_size=4",
                                 "training.recompute=full"]),
    ("DP2 + distributed optimizer", 2, ["parallel.use_distributed_optimizer=true"]),
    ("CP2", 2, ["parallel.context_parallel_size=2"]),
    ("LoRA r8", 1, ["finetune.lora_rank=8"]),
    ("LoRA r8, TP2 + SP", 2, ["finetune.lora_rank=8", "parallel.tensor_model_parallel_size=2",
                              "parallel.sequence_parallel=true"]),
]


def measure(rank: int, world_size: int, overrides: list) -> tuple[int, int]:
    import torch

    from cogvx_mega.config import load_config
    from cogvx_mega.tools.plan import estimate_memory, measure_peak_memory

    torch.set_num_threads(1)
    config = load_config("tiny", overrides=[*BASE, *overrides])
    return measure_peak_memory(config), estimate_memory(config, world_size).total


def run_all(layouts=LAYOUTS):
    from launcher import run_ranks

    rows = []
    for name, ranks, overrides in layouts:
        results = run_ranks(ranks, measure, overrides, timeout=300)
        rows.append((name, max(r[0] for r in results), results[0][1]))
    return rows


if __name__ == "__main__":
    for name, measured, predicted in run_all():
        print(f"{name:30} measured {measured / 1e6:7.2f} MB  predicted {predicted / 1e6:7.2f} MB  "
              f"({predicted / measured - 1:+.1%})")
