"""Training-step throughput of one process: forward + backward + AdamW on random latents.

    python benchmarks/train_step.py --preset tiny --device cpu
    python benchmarks/train_step.py --preset cogvideox-5b --device cuda model.num_layers=4 --micro-batch 1

    python benchmarks/train_step.py --preset cogvideox-5b --device cuda model.num_layers=8 --compare-diffusers
    python benchmarks/train_step.py --preset cogvideox-5b --device cuda model.num_layers=8 model.backend=te \
        model.fp8=hybrid

Prints the device, the shape, mean step time and tokens/s over the timed steps (after warm-up), the model
TFLOP/s (3 x forward FLOPs, forward = 24 D^2 S + 4 S^2 D per layer and sample) and MFU against
--peak-tflops, and the peak GPU memory on CUDA; with --compare-diffusers the same for diffusers'
CogVideoXTransformer3DModel at the same shape in the same run (forward, backward and torch AdamW, bf16
autocast). Numbers go to docs/performance.md with the command and device.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def time_train_step(preset: str, device: str, overrides: list[str], warmup: int, steps: int):
    """(config, trainer, seconds of each timed step) for one process training `preset` on random latents."""
    from cogvx_mega.config import load_config
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.trainer import Trainer

    config = load_config(preset, overrides=[f"training.device={device}", "training.run_dir='/tmp/cogvx-bench'",
                                            *overrides])
    dims = initialize_parallel(config.parallel, device=device)
    chunks = build_model_chunks(config.model, config.parallel, device=device, seed=config.training.seed)
    trainer = Trainer(config, dims, chunks)
    frames, height, width = config.data.latent_shape(config.model)
    batch_size = config.training.micro_batch_size
    batch = {"latents": torch.randn(batch_size, frames, config.model.in_channels, height, width),
             "text_embeds": torch.randn(batch_size, config.model.max_text_seq_length, config.model.text_embed_dim)}
    times = []
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.train_step(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return config, trainer, times


def model_flops_per_step(model, tokens: int, batch: int) -> float:
    """3 x forward FLOPs of a training step (cogvx_mega.model.flops, the formula the training metrics use)."""
    from cogvx_mega.model.flops import training_flops

    return training_flops(model, [tokens] * batch)


def time_diffusers_step(config, device: str, warmup: int, steps: int) -> list[float]:
    """Seconds per training step of diffusers' CogVideoXTransformer3DModel at the config's shape."""
    from diffusers import CogVideoXTransformer3DModel

    from cogvx_mega.checkpoint.transformer import diffusers_config_from_model

    m = config.model
    model = CogVideoXTransformer3DModel(**diffusers_config_from_model(m)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    frames, height, width = config.data.latent_shape(m)
    batch = config.training.micro_batch_size
    latents = torch.randn(batch, frames, m.in_channels, height, width, device=device)
    text = torch.randn(batch, m.max_text_seq_length, m.text_embed_dim, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(latents, text, timesteps, return_dict=False)[0]
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak of the GPU for MFU (H100/H200 SXM: 989)")
    parser.add_argument("--compare-diffusers", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    overrides = list(args.overrides)
    if args.micro_batch:
        overrides.append(f"training.micro_batch_size={args.micro_batch}")
    config, trainer, times = time_train_step(args.preset, args.device, overrides, args.warmup, args.steps)
    dtype = torch.bfloat16 if args.device == "cuda" and config.training.bf16 else torch.float32
    step_s = statistics.mean(times)
    batch_size = config.training.micro_batch_size
    tokens = batch_size * trainer.tokens_per_sample()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}, " \
                                                                          f"{torch.get_num_threads()} threads"
    print(f"device: {device}; torch {torch.__version__}; compute dtype {dtype}")
    print(f"preset {config.preset}: {config.model.num_layers} layers, hidden {config.model.hidden_size}, "
          f"{tokens // batch_size} tokens/sample, micro-batch {batch_size}")
    flops = model_flops_per_step(config.model, trainer.tokens_per_sample(), batch_size)
    print(f"step: {step_s * 1e3:.1f} ms (mean of {len(times)}, min {min(times) * 1e3:.1f}); "
          f"{tokens / step_s:,.0f} tokens/s; {flops / step_s / 1e12:.1f} model TFLOP/s "
          f"(MFU {flops / step_s / 1e12 / args.peak_tflops:.1%} of {args.peak_tflops:g})")
    if args.device == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if args.compare_diffusers:
        del trainer
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        reference = statistics.mean(time_diffusers_step(config, args.device, args.warmup, args.steps))
        print(f"diffusers CogVideoXTransformer3DModel: {reference * 1e3:.1f} ms; {flops / reference / 1e12:.1f} "
              f"model TFLOP/s; cogvx-mega is {reference / step_s:.2f}x")
        if args.device == "cuda":
            print(f"diffusers peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
