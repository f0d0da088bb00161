"""Training-step throughput of one process: forward + backward + AdamW on random latents.

    python benchmarks/train_step.py --preset tiny --device cpu
    python benchmarks/train_step.py --preset cogvideox-5b --device cuda model.num_layers=4 --micro-batch 1

    python benchmarks/train_step.py --preset cogvideox-5b --device cuda model.num_layers=4 --compare-diffusers
    python benchmarks/train_step.py --preset cogvideox-5b --device cuda model.num_layers=4 model.backend=te \
        model.fp8=hybrid
    python benchmarks/train_step.py --preset cogvideox-5b --device cpu --compare-diffusers --profile 3 \
        model.num_layers=2 model.num_attention_heads=8 ...        # the top ops of both steps side by side

Prints the device, the shape, the median and mean step time over the timed steps (after warm-up), tokens/s,
the model TFLOP/s (3 x forward FLOPs, forward = 24 D^2 S + 4 S^2 D per layer and sample) and MFU against
--peak-tflops, and the peak GPU memory on CUDA. With --compare-diffusers the same for diffusers'
CogVideoXTransformer3DModel at the same shape in the same run, stepped as diffusers' CogVideoX training
scripts step it (`diffusers_step`; bf16 autocast on CUDA). Both steps do the same work: noising, forward
(RoPE included for the 5B-class models), the v-prediction MSE, backward, gradient clipping and a fused
AdamW update.

On CPU the two steps alternate (ours, diffusers', ours, ...) so that a noisy machine slows both alike, and the
ratio is of the medians; on CUDA they run one after the other, so that each has its own peak memory.
--profile N adds a torch.profiler table of N more steps of each: self time per step by op, ours beside
diffusers'. Numbers go to docs/performance.md with the command and device.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable, Optional

import torch
from timing import emit_result, seconds_of  # benchmarks/timing.py, beside this script


def build_trainer(preset: str, device: str, overrides: list[str]):
    """(config, trainer, batch): a one-process trainer of `preset` and one batch of random latents."""
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
    m = config.model
    batch = {"latents": torch.randn(batch_size, frames, m.in_channels, height, width),
             "text_embeds": torch.randn(batch_size, m.max_text_seq_length, m.text_embed_dim)}
    return config, trainer, batch


def diffusers_weights(config, trainer) -> dict:
    """The trainer's model weights under diffusers' names (on the CPU)."""
    from cogvx_mega.checkpoint.transformer import project_to_diffusers

    ours = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()
            if not k.endswith("_extra_state")}
    return project_to_diffusers(ours, config.model)


def diffusers_step(config, device: str, weights: Optional[dict] = None) -> Callable[[], None]:
    """One training step of diffusers' CogVideoXTransformer3DModel at the config's shape, as a closure: what
    diffusers' CogVideoX training scripts do (examples/cogvideo): noise, a random timestep, the scheduler's
    add_noise and v target, the transformer with the pipelines' RoPE tables (5B-class models), the MSE, backward,
    gradient clipping at the config's training.grad_clip, AdamW (the fused kernel, as ours). With `weights`
    (`diffusers_weights`) the model starts from the trainer's, so that both steps compute on the same numbers (on a CPU the
    speed of a matrix product depends on them: products that underflow to subnormal floats are slow)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

    from cogvx_mega.checkpoint.transformer import diffusers_config_from_model

    m, d = config.model, config.diffusion
    model = CogVideoXTransformer3DModel(**diffusers_config_from_model(m))
    if weights is not None:
        model.load_state_dict(weights)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    scheduler = CogVideoXDDIMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start,
                                       beta_end=d.beta_end, beta_schedule="scaled_linear",
                                       prediction_type="v_prediction", rescale_betas_zero_snr=d.zero_terminal_snr,
                                       snr_shift_scale=d.snr_shift_scale)
    frames, height, width = config.data.latent_shape(m)
    batch = config.training.micro_batch_size
    latents = torch.randn(batch, frames, m.in_channels, height, width, device=device)
    text = torch.randn(batch, m.max_text_seq_length, m.text_embed_dim, device=device)
    rope = None
    if m.uses_rope:  # the pipelines' tables (the training scripts build them the same way)
        pipeline = CogVideoXPipeline.__new__(CogVideoXPipeline)  # only its position helper is used
        pipeline.__dict__.update(transformer=model, vae_scale_factor_spatial=8)
        rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipeline, height * 8, width * 8, frames,
                                                                        torch.device(device))

    def step() -> None:
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, d.num_train_timesteps, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            prediction = model(noisy, text, timesteps, image_rotary_emb=rope, return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction.float(), target.float()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.training.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(steps: dict[str, Callable[[], None]], device: str, warmup: int, repeats: int,
               interleave: bool) -> dict[str, list[float]]:
    """Seconds of each timed call of every step function, after `warmup` calls of each; interleaved: one
    call of each in turn, otherwise all of one step's calls before the next's."""
    times = {name: [] for name in steps}
    if interleave:
        for index in range(warmup + repeats):
            for name, step in steps.items():
                seconds = seconds_of(step, device)
                if index >= warmup:
                    times[name].append(seconds)
        return times
    for name, step in steps.items():
        for index in range(warmup + repeats):
            seconds = seconds_of(step, device)
            if index >= warmup:
                times[name].append(seconds)
    return times


def time_train_step(preset: str, device: str, overrides: list[str], warmup: int, steps: int):
    """(config, trainer, seconds of each timed step) for one process training `preset` on random latents."""
    config, trainer, batch = build_trainer(preset, device, overrides)
    times = time_steps({"ours": lambda: trainer.train_step(batch)}, device, warmup, steps, interleave=False)
    return config, trainer, times["ours"]


def model_flops_per_step(model, tokens: int, batch: int) -> float:
    """3 x forward FLOPs of a training step (cogvx_mega.model.flops, the formula the training metrics use)."""
    from cogvx_mega.model.flops import training_flops

    return training_flops(model, [tokens] * batch)


def profile_table(steps: dict[str, Callable[[], None]], repeats: int, rows: int = 20) -> str:
    """Self time per step of the heaviest ops of each step function, side by side (ms per step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    per_op = {}
    for name, step in steps.items():
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        device_time = torch.cuda.is_available()
        per_op[name] = {event.key: (event.self_device_time_total if device_time else event.self_cpu_time_total)
                        / 1e3 / repeats for event in prof.key_averages()}
    names = list(steps)
    ranked = sorted({op for table in per_op.values() for op in table},
                    key=lambda op: -max(per_op[name].get(op, 0.0) for name in names))[:rows]
    lines = [f"| op | {' | '.join(f'{name} ms/step' for name in names)} |",
             f"|---|{'---:|' * len(names)}"]
    for op in ranked:
        lines.append(f"| `{op[:60]}` | " + " | ".join(f"{per_op[name].get(op, 0.0):.1f}" for name in names) + " |")
    totals = " | ".join(f"{sum(per_op[name].values()):.1f}" for name in names)
    lines.append(f"| all ops (self time) | {totals} |")
    return "\n".join(lines)


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
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then profile N more steps of each and print the top ops side by side")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    overrides = list(args.overrides)
    if args.micro_batch:
        overrides.append(f"training.micro_batch_size={args.micro_batch}")
    config, trainer, batch = build_trainer(args.preset, args.device, overrides)
    initial_weights = diffusers_weights(config, trainer) if args.compare_diffusers else None
    steps = {"cogvx-mega": lambda: trainer.train_step(batch)}
    interleave = args.device == "cpu"
    if args.compare_diffusers and interleave:
        steps["diffusers"] = diffusers_step(config, args.device, initial_weights)
    times = time_steps(steps, args.device, args.warmup, args.steps, interleave)

    dtype = torch.bfloat16 if args.device == "cuda" and config.training.bf16 else torch.float32
    batch_size = config.training.micro_batch_size
    tokens_per_sample = trainer.tokens_per_sample()
    tokens = batch_size * tokens_per_sample
    flops = model_flops_per_step(config.model, tokens_per_sample, batch_size)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}, " \
                                                                          f"{torch.get_num_threads()} threads"
    print(f"device: {device}; torch {torch.__version__}; compute dtype {dtype}")
    print(f"preset {config.preset}: {config.model.num_layers} layers, hidden {config.model.hidden_size}, "
          f"{tokens_per_sample} tokens/sample, micro-batch {batch_size}"
          f"{'; steps interleaved with diffusers' if len(steps) > 1 else ''}")

    def report(name: str, seconds: list[float]) -> float:
        median = statistics.median(seconds)
        print(f"{name}: {median * 1e3:.1f} ms median (mean {statistics.mean(seconds) * 1e3:.1f}, min "
              f"{min(seconds) * 1e3:.1f}, {len(seconds)} steps); {tokens / median:,.0f} tokens/s; "
              f"{flops / median / 1e12:.1f} model TFLOP/s (MFU {flops / median / 1e12 / args.peak_tflops:.1%} of "
              f"{args.peak_tflops:g})")
        return median

    ours = report("cogvx-mega step", times["cogvx-mega"])
    result = dict(kind="train_step", device_type=args.device, device=device, preset=config.preset,
                  layers=config.model.num_layers, hidden=config.model.hidden_size, tokens=tokens_per_sample,
                  micro_batch=batch_size, backend=config.model.backend, fp8=config.model.fp8, step_ms=ours * 1e3,
                  tflops=flops / ours / 1e12, mfu=flops / ours / 1e12 / args.peak_tflops)
    if args.device == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak memory: {result['peak_gib']:.2f} GiB")
    if args.compare_diffusers:
        if not interleave:  # one after the other: ours is freed first, so diffusers' peak memory is its own
            ours_step = steps.pop("cogvx-mega")
            if not args.profile:
                del ours_step, trainer
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            steps["diffusers"] = diffusers_step(config, args.device, initial_weights)
            times.update(time_steps({"diffusers": steps["diffusers"]}, args.device, args.warmup, args.steps, False))
            if args.profile:
                steps = {"cogvx-mega": ours_step, **steps}
        reference = report("diffusers CogVideoXTransformer3DModel step", times["diffusers"])
        print(f"cogvx-mega is {reference / ours:.2f}x diffusers (ratio of the medians)")
        result.update(diffusers_step_ms=reference * 1e3, diffusers_tflops=flops / reference / 1e12,
                      speedup=reference / ours)
        if args.device == "cuda":
            result["diffusers_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(f"diffusers peak memory: {result['diffusers_peak_gib']:.2f} GiB")
    emit_result(**result)
    if args.profile:
        print(f"\nself time by op, mean of {args.profile} profiled steps each:\n")
        print(profile_table(steps, args.profile))


if __name__ == "__main__":
    main()
