"""Multi-resolution frame pack: useful tokens/s of packed vs padded vs bucketed training, and the block-diagonal
attention kernels, on the reference mix of clip sizes (`cogvx_mega.data.packing.REFERENCE_MIX`: 49/25/13-frame
videos in two orientations, 256px clips and images).

    python benchmarks/packing.py --device cpu                        # 1/4 spatial scale, a small model
    python benchmarks/packing.py --device cuda --spatial-divisor 1 --text-length 226 \
        --heads 48 --head-dim 64 --layers 2                          # CogVideoX-5B width at full scale

Forward + backward of the transformer (no optimizer) over the same clips three ways:
- packed: clips packed best-fit-decreasing into sequences of `--budget` x the longest clip (`forward_packed`);
- padded: one clip per sequence, padded to the longest clip (fixed shapes; pad masked);
- bucketed: micro-batches of same-size clips, each about one pack's worth of tokens, no padding (the cache
  reader's strict buckets; clips of a size that fill no micro-batch are left out of this variant).
Useful tokens are the clips' real tokens (text + video); the fraction divides them by the tokens computed.
Then one pack's attention timed with each `model.packed_attention` kernel.
"""
from __future__ import annotations

import argparse
import platform

import torch
from timing import median_seconds  # benchmarks/timing.py, beside this script


def build(args):
    from cogvx_mega.config.model import ModelConfig
    from cogvx_mega.model.transformer import build_model

    model = ModelConfig(num_layers=args.layers, num_attention_heads=args.heads, attention_head_dim=args.head_dim,
                        in_channels=16, out_channels=16, time_embed_dim=256, text_embed_dim=256,
                        max_text_seq_length=args.text_length, sample_height=60 // args.spatial_divisor // 2 * 2,
                        sample_width=90 // args.spatial_divisor // 2 * 2, positional_embedding="rope",
                        packed_attention=args.kernel)
    return model, build_model(model, device=args.device)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--spatial-divisor", type=int, default=4)
    parser.add_argument("--text-length", type=int, default=16)
    parser.add_argument("--budget", type=int, default=2, help="pack tokens as a multiple of the longest clip")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--kernel", default="per_clip")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from cogvx_mega.data.packing import best_fit_decreasing, reference_mix_grids
    from cogvx_mega.model.packing import ClipShape, clip_tokens

    model_config, model = build(args)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    grids = reference_mix_grids(args.clips, seed=0, spatial_divisor=args.spatial_divisor)
    shapes = [ClipShape(*grid, args.text_length) for grid in grids]
    tokens = [clip_tokens(model_config, shape) for shape in shapes]
    longest = max(tokens)
    budget = args.budget * longest
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(t, 16, h, w, generator=generator).to(device) for t, h, w in grids]
    texts = [torch.randn(args.text_length, 256, generator=generator).to(device) for _ in grids]
    steps = torch.randint(0, 1000, (args.clips,), generator=generator).to(device)
    useful = sum(tokens)

    def run_packs(groups, length):
        for group in groups:
            with torch.autocast("cuda", dtype=dtype, enabled=device == "cuda"):
                outs = model.forward_packed([latents[i] for i in group], [texts[i] for i in group], steps[group],
                                            pack_length=length)
            sum(o.float().square().mean() for o in outs).backward()

    packs = best_fit_decreasing(tokens, budget)
    by_size: dict = {}
    for index, grid in enumerate(grids):
        by_size.setdefault(grid, []).append(index)
    buckets = []
    for grid, members in by_size.items():
        per_batch = max(1, budget // clip_tokens(model_config, ClipShape(*grid, args.text_length)))
        buckets.extend(members[k:k + per_batch] for k in range(0, len(members) - per_batch + 1, per_batch))
    bucketed_useful = sum(tokens[i] for batch in buckets for i in batch)

    def run_buckets():
        for batch in buckets:
            with torch.autocast("cuda", dtype=dtype, enabled=device == "cuda"):
                out = model(torch.stack([latents[i] for i in batch]), torch.stack([texts[i] for i in batch]),
                            steps[batch])
            out.float().square().mean().backward()

    variants = {
        "packed": (lambda: run_packs(packs, budget), useful, len(packs) * budget),  # fixed length, as on GPU
        "padded": (lambda: run_packs([[i] for i in range(args.clips)], longest), useful, args.clips * longest),
        "bucketed": (run_buckets, bucketed_useful, bucketed_useful),
    }
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {dtype}")
    print(f"model: {args.layers} layers, {args.heads} heads x {args.head_dim}; {args.clips} clips of the reference "
          f"mix at 1/{args.spatial_divisor} spatial scale, text {args.text_length}: {min(tokens)}..{longest} tokens, "
          f"{useful} in all; pack budget {budget} ({len(packs)} packs)")
    print("| variant | sequences | useful tokens | computed tokens | useful fraction | fwd+bwd s | useful tokens/s |")
    print("|---|---|---|---|---|---|---|")
    counts = {"packed": len(packs), "padded": args.clips, "bucketed": len(buckets)}
    for name, (fn, real, computed) in variants.items():
        if not computed:
            print(f"| {name} | 0 | - | - | - | - | no size has enough clips for a micro-batch |")
            continue
        seconds = median_seconds(fn, device, args.repeats)
        print(f"| {name} | {counts[name]} | {real} | {computed} | {real / computed:.3f} | {seconds:.3f} | "
              f"{real / seconds:,.0f} |")

    # one pack's attention per kernel: q/k/v of the first pack, forward + backward
    from cogvx_mega.parallel.varlen import varlen_attention

    pack = max(packs, key=lambda group: (len(group), sum(tokens[i] for i in group)))  # the most clips
    cu = [0]
    for i in pack:
        cu.append(cu[-1] + tokens[i])
    q, k, v = (torch.randn(cu[-1], args.heads, args.head_dim, generator=generator).to(device, dtype)
               .requires_grad_() for _ in range(3))
    print(f"\nattention of one pack ({len(pack)} clips, {cu[-1]} tokens, {args.heads} heads x {args.head_dim}):")
    print("| kernel | forward s | forward + backward s |")
    print("|---|---|---|")
    for kernel in ("per_clip", "sdpa_mask", "flex", "flash"):
        cells = []
        for backward in (False, True):
            def step(kernel=kernel, backward=backward):
                inputs = (q, k, v) if backward else (q.detach(), k.detach(), v.detach())
                out = varlen_attention(*inputs, cu, cu, None, kernel)
                if backward:
                    out.float().sum().backward()
            try:
                if backward:
                    cells.append(f"{median_seconds(step, device, args.repeats):.4f}")
                else:
                    with torch.no_grad():
                        cells.append(f"{median_seconds(step, device, args.repeats):.4f}")
            except (RuntimeError, ImportError) as error:
                cells.append(f"not run ({str(error).splitlines()[0][:60]})")
        print(f"| {kernel} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
