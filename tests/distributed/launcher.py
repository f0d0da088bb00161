"""Run a function on N gloo ranks forked from the test process.

Forking skips the per-rank interpreter start-up, and the parent imports megatron-core and the project's training,
sampling, export and VAE modules once (`preload`) so that no rank imports them again: megatron-core alone is 2.7 s
an import, and four ranks importing at once on 2 cores took 6.5 s of every 8 s layout run. The parent must not
have created a process group itself (importing makes none); the distributed tier therefore runs in its own pytest
process.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

import torch


PRELOADED = ("megatron.core", "megatron.core.pipeline_parallel", "megatron.core.optimizer",
             "megatron.core.dist_checkpointing", "cogvx_mega.cli", "cogvx_mega.run.training",
             "cogvx_mega.training.trainer", "cogvx_mega.model.transformer", "cogvx_mega.training.vae_trainer",
             "cogvx_mega.tools.plan", "cogvx_mega.tools.export", "cogvx_mega.checkpoint.reader",
             "cogvx_mega.data.cache")
"""What the ranks of this tier import, imported by the parent before its first fork."""


def preload() -> None:
    """Import PRELOADED here, once per test process (later calls find them in sys.modules). Importing starts no
    thread and makes no process group, so forking after it stays safe."""
    import importlib

    for name in PRELOADED:
        importlib.import_module(name)


def host_store():
    """The rendezvous store, served by the parent on a port the kernel picks and the parent keeps bound.

    Asking for a free port and handing its number to rank 0 races: between the probe and rank 0's bind, any
    outgoing connection on the machine (another test worker's ranks talking to their own store) may be given
    the same number as its ephemeral source port, and rank 0 then fails with EADDRINUSE. The parent binds
    once instead and the ranks all connect as clients, as torchrun's agent store does
    (TORCHELASTIC_USE_AGENT_STORE: env:// rendezvous then makes every rank a client)."""
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _rank_main(rank: int, world_size: int, ports, fn: Callable, args: tuple, results, timeout: float) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(max(1.0, timeout - 5), exit=True)  # a hung rank shows where it hangs
    port = ports.get()  # the store is made once every rank is forked (see run_ranks)
    # One intra-op thread per rank: the parent's OpenMP pool does not survive fork (a child entering a
    # parallel region, e.g. a large torch.zeros, deadlocks once the parent has run threaded ops), and
    # ranks share the machine's cores anyway.
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), TORCHELASTIC_USE_AGENT_STORE="True")
    try:
        value = fn(rank, world_size, *args)
        # by value: a pickled tensor would otherwise travel as a shared-memory handle that the parent
        # fetches from this process, which may already have exited
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report any failure to the parent rather than hanging it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        from cogvx_mega.parallel.state import shutdown

        try:
            if dist.is_initialized():
                dist.barrier()  # nobody leaves (tearing its communicator down) while a peer still needs it
            shutdown()
            from cogvx_mega.parallel import cpu_compat

            cpu_compat.release_checkpoint_queue()
        except Exception:
            pass
        # flush the result to the parent before the hard exit: os._exit skips the queue's feeder thread
        results.close()
        results.join_thread()
        os._exit(0)


def run_ranks(world_size: int, fn: Callable, *args, timeout: float = 120.0) -> list[Any]:
    """fn(rank, world_size, *args) on each rank; returns the values by rank or raises with the failing traceback."""
    preload()
    context = mp.get_context("fork")
    results, ports = context.Queue(), context.SimpleQueue()
    processes = [context.Process(target=_rank_main, args=(r, world_size, ports, fn, args, results, timeout))
                 for r in range(world_size)]
    for p in processes:
        p.start()
    values: dict[int, Any] = {}
    store = None
    try:
        # The store's server thread starts only now: a rank forked while it served another rank's connection
        # could inherit one of its locks held, and hang connecting (seen once ranks no longer spent seconds
        # importing before they connected)
        store = host_store()
        for _ in processes:
            ports.put(store.port)
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            values[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in processes:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        del store  # stops the server once every rank has gone
    return [values[r] for r in range(world_size)]
