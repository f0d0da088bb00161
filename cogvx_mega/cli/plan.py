"""`cogvx plan`: the TP/PP/VPP/CP/DP/recompute layouts that fit a GPU budget, fastest first (tools/plan.py)."""
from __future__ import annotations

import argparse
import json

NAME = "plan"
HELP = "the TP/PP/VPP/CP/DP/recompute layouts that fit a GPU budget, ranked by predicted step time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-mem", type=float, required=True, help="GiB per GPU")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--size", default="480x720", help="HEIGHTxWIDTH in pixels")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--top", type=int, default=20, help="rows to print")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")


def run(args: argparse.Namespace) -> int:
    from cogvx_mega.config import load_config
    from cogvx_mega.config.errors import ConfigError, parse_size
    from cogvx_mega.tools.plan import describe_plans, plan_layouts

    height, width = parse_size("--size", args.size)
    for flag, value in (("--gpus", args.gpus), ("--gpus-per-node", args.gpus_per_node),
                        ("--global-batch", args.global_batch)):
        if value < 1:
            raise ConfigError(flag, value, "use a positive number")
    if not args.gpu_mem > 0:
        raise ConfigError("--gpu-mem", args.gpu_mem, "give the GPU memory in GiB, e.g. 80")
    config = load_config(args.preset, overrides=[
        f"data.num_frames={args.frames}", f"data.height={height}", f"data.width={width}", "data.buckets=null",
        "training.device=cuda", "training.micro_batch_size=1", f"training.global_batch_size={args.global_batch}",
        *args.overrides])
    plans, considered = plan_layouts(config, args.gpus, args.gpu_mem, args.gpus_per_node, fp8=args.fp8)
    if args.json:
        print(json.dumps({"considered": considered, "layouts": [plan.as_dict() for plan in plans]}))
    else:
        print(describe_plans(plans, considered, limit=args.top))
    if not plans:
        raise ConfigError("--gpus", args.gpus, f"no layout of {args.gpus} GPUs fits {args.gpu_mem:g} GiB at "
                                               f"{args.frames} frames {args.size}; add GPUs or lower the resolution")
    return 0
