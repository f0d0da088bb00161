"""Run a training function on N spawned NCCL ranks (so CUDA is never initialised in the pytest process).

`target(rank, world_size, port, overrides, results)` puts (rank, "ok", value) or (rank, "error", traceback)."""
from __future__ import annotations

import multiprocessing as mp
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, world_size: int, overrides: list) -> list:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    ranks = [context.Process(target=target, args=(rank, world_size, port, overrides, results))
             for rank in range(world_size)]
    for process in ranks:
        process.start()
    collected = {}
    try:
        for _ in ranks:
            rank, status, value = results.get(timeout=600)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            collected[rank] = value
    finally:
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return [collected[rank] for rank in range(world_size)]
