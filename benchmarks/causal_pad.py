"""The causal-conv boundary kernel (`kernels/causal_pad`) against its torch reference, on contiguous and on
strided input (the halo path's real input: the causal conv's output narrowed to T frames).

    python benchmarks/causal_pad.py --device cuda      # time and bandwidth per call, bytes allocated per call
    python benchmarks/causal_pad.py --device cpu       # bytes allocated per call only (the kernel runs under
                                                       # TRITON_INTERPRET=1, far too slowly to time)

The reference is the test's (`causal_boundary_input_ref`, then `.contiguous()` as the op returns it). Bytes
allocated per call are the storages that ops create during the call (a TorchDispatchMode; views of the
inputs do not count), so a copy of the input shows up on any device.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class NewStorageBytes(TorchDispatchMode):
    """Bytes of the distinct storages ops create while active (storages that existed before do not count)."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.seen = {t.untyped_storage().data_ptr() for t in existing}
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in self.seen:
                    self.seen.add(storage.data_ptr())
                    self.bytes += storage.nbytes()
        return out


def allocated_bytes(fn, existing: list[torch.Tensor]) -> int:
    tracker = NewStorageBytes(existing)
    with tracker:
        fn()
    return tracker.bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--size", default="60x90", help="HxW of the activation (CogVideoX's widest level, reduced)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        args.dtype, args.channels, args.size = "float32", 16, "20x30"
    from cogvx_mega.kernels.causal_pad.ref import causal_boundary_input_ref
    from cogvx_mega.kernels.causal_pad.triton import causal_boundary_input_triton

    height, width = map(int, args.size.split("x"))
    dtype = getattr(torch, args.dtype)
    buffer = torch.randn(1, args.channels, args.frames + 2, height, width, device=args.device, dtype=dtype)
    inputs = {"contiguous": buffer[:, :, :args.frames].contiguous(), "strided (conv output view)":
              buffer.narrow(2, 0, args.frames)}
    halo = torch.randn(1, args.channels, 2, height, width, device=args.device, dtype=dtype)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'} (interpreter)"
    print(f"device: {device}; torch {torch.__version__}; {args.dtype}; x [1, {args.channels}, {args.frames}, "
          f"{height}, {width}], pad 2")
    print("| input | implementation | halo | allocated per call | time per call | bandwidth |")
    print("|---|---|---|---|---|---|")
    for input_name, x in inputs.items():
        for with_halo in (True, False):
            given = halo if with_halo else None
            out_bytes = causal_boundary_input_ref(x, given, 2).numel() * x.element_size()
            for name, fn in (("triton", lambda: causal_boundary_input_triton(x, given, 2)),
                             ("torch reference", lambda: causal_boundary_input_ref(x, given, 2).contiguous())):
                allocated = allocated_bytes(fn, [buffer, x, halo])
                timing, bandwidth = "-", "-"
                if args.device == "cuda":
                    for _ in range(5):
                        fn()
                    torch.cuda.synchronize()
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        fn()
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - start)
                    seconds = statistics.median(times)
                    timing = f"{seconds * 1e6:.1f} us"
                    bandwidth = f"{2 * out_bytes / seconds / 1e9:.0f} GB/s"  # read + write of the output's size
                print(f"| {input_name} | {name} | {'yes' if with_halo else 'no'} | {allocated / 2**20:.2f} MiB "
                      f"(output {out_bytes / 2**20:.2f}) | {timing} | {bandwidth} |")


if __name__ == "__main__":
    main()
