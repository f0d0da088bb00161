"""What the weight average (training.ema_decay) costs a training step: memory and time.

    python benchmarks/ema_overhead.py --preset tiny --device cpu
    python benchmarks/ema_overhead.py --preset cogvideox-2b --device cpu model.num_layers=2 data.num_frames=9 \
        data.height=128 data.width=128

Builds two one-process trainers of the same model (`train_step.build_trainer`), one with the average, and times
their steps alternately (one of each in turn, so a noisy machine slows both alike); the overhead is the ratio of
the medians. Memory: the average's bytes (`WeightAverage.memory_bytes`) beside the fp32 bytes of the rank's
parameters: the issue allows one fp32 copy of the rank's shard. The update itself (a fused multiply-add per
tensor) is timed alone too. Numbers go to docs/performance.md with the command and device.
"""
from __future__ import annotations

import argparse
import statistics

import torch
from timing import seconds_of  # benchmarks/timing.py, beside this script
from train_step import build_trainer, time_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    plain_config, plain, plain_batch = build_trainer(args.preset, args.device, args.overrides)
    ema_config, averaged, ema_batch = build_trainer(args.preset, args.device,
                                                    [*args.overrides, "training.ema_decay=0.9999"])
    times = time_steps({"plain": lambda: plain.train_step(plain_batch),
                        "ema": lambda: averaged.train_step(ema_batch)}, args.device, args.warmup, args.steps,
                       interleave=True)
    update = statistics.median(seconds_of(lambda: averaged.ema.update(averaged.step), args.device)
                               for _ in range(args.steps))
    plain_s, ema_s = statistics.median(times["plain"]), statistics.median(times["ema"])
    parameters = sum(p.numel() for chunk in averaged.model_chunks for p in chunk.parameters())
    print(f"device {args.device} ({torch.get_num_threads()} threads), preset {args.preset} {' '.join(args.overrides)}")
    print(f"parameters {parameters:,} (fp32 {parameters * 4 / 2**20:.1f} MiB); average {averaged.ema.memory_bytes() / 2**20:.1f} "
          f"MiB = {averaged.ema.memory_bytes() / (parameters * 4):.3f} fp32 copies")
    print(f"step median: plain {plain_s * 1e3:.1f} ms, with the average {ema_s * 1e3:.1f} ms "
          f"({(ema_s / plain_s - 1) * 100:+.2f}%); the update alone {update * 1e3:.2f} ms "
          f"({update / plain_s * 100:.2f}% of a step)")


if __name__ == "__main__":
    main()
