"""Peak memory and time per rank of the 3D VAE split over time (context parallel), the chunked
single-process mode, and the naive pad-and-concatenate causal convolution.

    python benchmarks/vae_cp.py --device cpu                       # CP 1/2/4 as forked gloo ranks
    python benchmarks/vae_cp.py --device cuda --cp 1                # one GPU: whole clip and chunked
    torchrun --nproc-per-node 4 benchmarks/vae_cp.py --device cuda  # CP = the torchrun world

Each configuration encodes one clip (and decodes its latents) without gradients. Peak memory is what the
call allocates beyond what existed before it: on CUDA `torch.cuda.max_memory_allocated`; on CPU the
peak of live tensor bytes created during the call, tracked by a TorchDispatchMode (every tensor an op
returns counts until its last reference dies; library-internal scratch buffers are not tensors and are
not counted). It also prints how far the chunked mode (per-chunk GroupNorm, as diffusers) is from the
exact whole-clip result.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import time
import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage created inside the context (CPU or any device)."""

    def __init__(self):
        super().__init__()
        self.references: dict[int, int] = defaultdict(int)
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        if key not in self.sizes:
            self.sizes[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.references[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.references[key] -= 1
        if self.references[key] == 0:
            self.current -= self.sizes.pop(key)
            del self.references[key]


def measure(fn, device: str):
    """(result, peak bytes, seconds) of fn()."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base, time.perf_counter() - start
    tracker = PeakTensorMemory()
    start = time.perf_counter()
    with tracker:
        result = fn()
    return result, tracker.peak, time.perf_counter() - start


def build(args, device):
    from cogvx_mega.vae import CogVideoXVAE, VAEConfig

    torch.manual_seed(0)
    if args.full:
        config = VAEConfig()
    else:
        config = VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8)
    model = CogVideoXVAE(config).to(device).eval()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return model.to(dtype), dtype


def run_configuration(args, device, cp_group, label, **kwargs) -> dict:
    model, dtype = build(args, device)
    generator = torch.Generator().manual_seed(1)
    video = (torch.rand(1, 3, args.frames, args.size, args.size, generator=generator) * 2 - 1).to(device, dtype)
    c = model.config
    latent_shape = (1, c.latent_channels, 1 + (args.frames - 1) // c.temporal_compression_ratio,
                    args.size // c.spatial_compression_ratio, args.size // c.spatial_compression_ratio)
    latents_in = torch.randn(latent_shape, generator=generator).to(device, dtype)
    with torch.no_grad():
        model.encode(video[:, :, :5], conv_impl=kwargs.get("conv_impl", "halo"))  # warm-up
        latents, encode_peak, encode_time = measure(lambda: model.encode(video, group=cp_group, **kwargs), device)
        _, decode_peak, decode_time = measure(lambda: model.decode(latents_in, group=cp_group, **kwargs), device)
    return {"label": label, "encode_peak": encode_peak, "encode_time": encode_time, "decode_peak": decode_peak,
            "decode_time": decode_time, "latents": latents.float().cpu()}


def _rank_main(rank, world, port, args, queue):
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for impl in ("halo", "naive"):
        results[impl] = run_configuration(args, "cpu", dist.group.WORLD, f"CP={world} {impl}", conv_impl=impl)
    dist.destroy_process_group()
    queue.put((rank, {k: {m: v for m, v in r.items() if m != "latents"} for k, r in results.items()}))


def fork_ranks(world, args) -> list[dict]:
    context = mp.get_context("fork")
    queue = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [context.Process(target=_rank_main, args=(r, world, port, args, queue)) for r in range(world)]
    for p in processes:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in processes)
    for p in processes:
        p.join()
    return [results[r] for r in range(world)]


def mib(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--frames", type=int, default=33, help="1 + 4k video frames")
    parser.add_argument("--size", type=int, default=64, help="height = width in pixels")
    parser.add_argument("--cp", type=int, nargs="*", default=[1, 2, 4], help="CPU: CP sizes to fork")
    parser.add_argument("--chunk-frames", type=int, default=2, help="latent frames per chunk in chunked mode")
    parser.add_argument("--threads", type=int, default=1, help="CPU: intra-op threads per rank")
    parser.add_argument("--full", action="store_true", help="the real CogVideoX VAE widths (GPU)")
    args = parser.parse_args()
    print(f"device={args.device} torch={torch.__version__} clip=1x3x{args.frames}x{args.size}x{args.size} "
          f"vae={'full' if args.full else 'block_out_channels=(32,64,64,64), 1 layer per block'}")
    rows = []
    if args.device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        for impl in ("halo", "naive"):
            result = run_configuration(args, "cuda", dist.group.WORLD, f"CP={dist.get_world_size()} {impl}",
                                       conv_impl=impl)
            print(f"rank {dist.get_rank()} {result['label']}: encode {mib(result['encode_peak'])} MiB "
                  f"{result['encode_time']:.3f} s, decode {mib(result['decode_peak'])} MiB {result['decode_time']:.3f} s")
        dist.destroy_process_group()
        return
    torch.set_num_threads(args.threads)
    single = {}
    for impl in ("halo", "naive"):
        single[impl] = run_configuration(args, args.device, None, f"whole clip {impl}", conv_impl=impl)
        rows.append((single[impl]["label"], 0, single[impl]))
    chunked = run_configuration(args, args.device, None, f"chunked ({args.chunk_frames} latent frames)",
                                chunk_frames=args.chunk_frames)
    rows.append((chunked["label"], 0, chunked))
    whole = single["halo"]["latents"]
    deviation = (chunked["latents"] - whole).abs().max().item()
    scale = whole.abs().max().item()
    if args.device == "cpu":
        for world in args.cp:
            if world == 1:
                continue
            for rank, result in enumerate(fork_ranks(world, args)):
                for impl in ("halo", "naive"):
                    rows.append((result[impl]["label"], rank, result[impl]))
    print(f"{'configuration':34} {'rank':>4} {'enc peak MiB':>13} {'x whole':>8} {'enc s':>7} "
          f"{'dec peak MiB':>13} {'x whole':>8} {'dec s':>7}")
    for label, rank, r in rows:
        base = single["naive" if "naive" in label else "halo"]
        print(f"{label:34} {rank:>4} {mib(r['encode_peak']):>13} {r['encode_peak'] / base['encode_peak']:>8.2f} "
              f"{r['encode_time']:>7.2f} {mib(r['decode_peak']):>13} {r['decode_peak'] / base['decode_peak']:>8.2f} "
              f"{r['decode_time']:>7.2f}")
    print(f"chunked-mode latents vs whole clip: max abs diff {deviation:.3e} (latent max {scale:.3f}); the "
          f"context-parallel split is exact (tests/distributed/test_vae_context_parallel.py)")


if __name__ == "__main__":
    main()
