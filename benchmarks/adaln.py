"""Expert AdaLN, forward + backward: the fused Triton ops (LayerNorm + shift/scale, gated residual add) vs the
unfused torch sequence the layer runs with model.adaln_impl=torch (`modulate` and `gated_add`: LayerNorm,
per-token lookup of the modulation, multiply-add, branch bias, gated add), on one branch of one layer.

    python benchmarks/adaln.py --device cuda                 # 17,776 tokens x 3072 (CogVideoX-5B), bf16 branch
    python benchmarks/adaln.py --device cpu --tokens 2048 --hidden 512

The branch is the identity (its output is the normed input), so only the AdaLN work is timed.
"""
from __future__ import annotations

import argparse
import platform

import torch
from timing import emit_result, median_seconds  # benchmarks/timing.py, beside this script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tokens", type=int, default=17776)
    parser.add_argument("--text", type=int, default=226)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from cogvx_mega.kernels.adaln.op import gated_add, gated_residual, modulate, modulated_layer_norm
    from cogvx_mega.kernels.backend import triton_runs_here

    device, s, h = args.device, args.tokens, args.hidden
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(s, 1, h, generator=generator).to(device)  # the fp32 residual stream
    weight, bias = torch.ones(h, device=device), torch.zeros(h, device=device)
    table = (0.1 * torch.randn(2, 3, h, generator=generator)).to(device)  # (video, text) x (shift, scale, gate)
    index = torch.zeros(s, 1, dtype=torch.long, device=device)
    index[:args.text] = 1
    branch_bias = torch.zeros(h, device=device)
    grad = torch.randn(s, 1, h, generator=generator).to(device)
    branch_dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def unfused(x, table, weight, bias, branch_bias):
        normed = modulate(torch.nn.functional.layer_norm(x, (h,), weight, bias, 1e-5), table, index)
        return gated_add(x, normed.to(branch_dtype), branch_bias, table, index)  # the branch: identity

    def fused(x, table, weight, bias, branch_bias):
        normed = modulated_layer_norm(x, weight, bias, 1e-5, table, index)
        return gated_residual(x, normed.to(branch_dtype), branch_bias, table, index)

    def step(fn):
        def run():
            leaves = [t.detach().clone().requires_grad_() for t in (x, table, weight, bias, branch_bias)]
            fn(*leaves).backward(grad)
        return run

    variants = {"torch (unfused)": unfused}
    if triton_runs_here(x):
        variants["triton (fused)"] = fused
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")
    print(f"device {device} ({name}), torch {torch.__version__}; {s} tokens x {h}, fp32 residual, "
          f"{branch_dtype} branch")
    print("| implementation | forward ms | forward + backward ms |")
    print("|---|---|---|")
    for label, fn in variants.items():
        with torch.no_grad():
            forward = median_seconds(lambda: fn(x, table, weight, bias, branch_bias), device, args.repeats)
        both = median_seconds(step(fn), device, args.repeats)
        print(f"| {label} | {forward * 1e3:.3f} | {both * 1e3:.3f} |")
        emit_result(kind="adaln", variant=label, device_type=device, tokens=s, hidden=h, forward_ms=forward * 1e3,
                    forward_backward_ms=both * 1e3)


if __name__ == "__main__":
    main()
