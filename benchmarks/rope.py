"""3D RoPE on q and k, forward + backward: the Triton kernel vs the torch reference, Transformer Engine's fused
RoPE and diffusers' `apply_rotary_emb`, against the copy bandwidth of the same bytes.

    python benchmarks/rope.py --device cuda                  # CogVideoX-5B: 17,776 tokens, 48 heads x 64, bf16
    python benchmarks/rope.py --device cpu --tokens 4096 --heads 8

Bytes moved per call = q and k read and written once (4 x tokens x heads x 64 x dtype size) plus the angles;
"of copy" divides the achieved bandwidth by a device copy of the same bytes measured in the same run.
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
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from cogvx_mega.kernels.backend import triton_runs_here
    from cogvx_mega.kernels.rope.op import apply_rope_3d
    from cogvx_mega.kernels.rope.ref import rope_3d_ref

    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    s, heads, d = args.tokens, args.heads, args.head_dim
    qkv = torch.randn(s, 1, 3 * heads, d, device=device, dtype=dtype)
    q, k = qkv[:, :, :heads].requires_grad_(False), qkv[:, :, heads:2 * heads]
    table = torch.zeros(s, 1, 1, d, device=device)
    table[args.text:] = torch.rand(s - args.text, 1, 1, d, device=device) * 40
    table = table.reshape(s, d // 2, 2)[..., :1].expand(s, d // 2, 2).reshape(s, 1, 1, d).contiguous()
    grad = torch.randn(s, 1, heads, d, device=device, dtype=dtype)
    moved = 4 * q.numel() * q.element_size() + table.numel() // 2 * 4

    def with_backward(rotate):
        def step():
            a, b = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
            out_q, out_k = rotate(a, b)
            torch.autograd.backward([out_q, out_k], [grad, grad])
        return step

    source = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_s = median_seconds(lambda: target.copy_(source), device, args.repeats)  # reads and writes `moved` bytes
    copy_bandwidth = moved / copy_s
    variants = {"torch reference": lambda a, b: apply_rope_3d(a, b, table, "torch")}
    if triton_runs_here(q):
        variants["triton (cogvx)"] = lambda a, b: apply_rope_3d(a, b, table, "triton")
    try:
        import transformer_engine  # noqa: F401

        if device == "cuda":
            variants["TE fused"] = lambda a, b: apply_rope_3d(a, b, table, "te")
    except ImportError:
        pass
    try:
        from diffusers.models.embeddings import apply_rotary_emb

        angles = table[args.text:, 0, 0]  # diffusers rotates the video tokens, given cos/sin [n, d]
        cos, sin = angles.cos(), angles.sin()

        def diffusers_rope(a, b):
            def one(x):  # [s, 1, h, d] -> diffusers' [1, h, s, d] on the video tokens, text untouched
                video = apply_rotary_emb(x[args.text:].permute(1, 2, 0, 3), (cos, sin)).permute(2, 0, 1, 3)
                return torch.cat([x[:args.text], video])
            return one(a), one(b)

        variants["diffusers apply_rotary_emb"] = diffusers_rope
    except ImportError:
        pass
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")
    print(f"device {device} ({name}), torch {torch.__version__}, {dtype}; q and k [{s}, 1, {heads}, {d}] "
          f"({args.text} text tokens); {moved / 1e6:.1f} MB per pass; copy {copy_bandwidth / 1e9:.1f} GB/s")
    print("| implementation | forward ms | forward + backward ms | forward GB/s | of copy |")
    print("|---|---|---|---|---|")
    check = rope_3d_ref(q.float(), table.reshape(s, -1)[:, ::2].float())
    for label, rotate in variants.items():
        out = rotate(q, k)[0].float()
        assert (out - check).abs().max().item() <= 0.05 * check.abs().max().item(), label
        with torch.no_grad():
            forward = median_seconds(lambda: rotate(q, k), device, args.repeats)
        both = median_seconds(with_backward(rotate), device, args.repeats)
        print(f"| {label} | {forward * 1e3:.3f} | {both * 1e3:.3f} | {moved / forward / 1e9:.1f} | "
              f"{moved / forward / copy_bandwidth:.0%} |")
        emit_result(kind="rope", variant=label, device_type=device, tokens=s, heads=heads, dtype=str(dtype),
                    forward_ms=forward * 1e3, forward_backward_ms=both * 1e3, forward_gbps=moved / forward / 1e9,
                    copy_gbps=copy_bandwidth / 1e9, of_copy=moved / forward / copy_bandwidth)


if __name__ == "__main__":
    main()
