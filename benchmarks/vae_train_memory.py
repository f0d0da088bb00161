"""Peak activation memory per rank of one VAE training step (`VAETrainer.train_step`) at context parallel 1, 2 and 4.

    .venv/bin/python benchmarks/vae_train_memory.py --frames 161 --size 256 --cp 1 2 4   # the issue's clip, GAN off
    .venv/bin/python benchmarks/vae_train_memory.py --frames 161 --size 128 --gan both   # GAN off and on
    .venv/bin/python benchmarks/vae_train_memory.py --frames 33 --size 64 --gan both --json out.json  # quick

On a 24 GiB CPU machine: 161 x 256^2 with the GAN off peaks at 13.5 GiB of tensors (15 GiB resident) at CP=1
with the default widths (4, 8, 8, 16); widths (8, 16, 16, 32) would need about 22 GiB of tensors there, and
the GAN on at 256^2 about 21 GiB (4x its 5.4 GiB at 128^2; CP ranks share the machine, so CP2 and CP4 need
about as much in all), so the GAN is measured at 128^2.

Each CP size runs on its own forked gloo ranks (tests/distributed/launcher.run_ranks, one intra-op thread a
rank), each rank building the trainer as `cogvx vae train` does (`build_layout`, `VAETrainer`) on random clips
(no video files: a stand-in for `data.vae_clips.VAETrainingClips` returns uniform noise in [-1, 1]). One
untracked warm-up step runs first (it creates AdamW's state), then one step is measured.

Counted: the peak of live tensor bytes created during that step (vae_cp.PeakTensorMemory: every tensor an op
returns counts until its last reference dies), i.e. everything the step allocates: the clip as read (every
rank reads the whole clip, as `read_batch` does), the activations kept for backward, gradients, the gathers,
the halo buffers and the optimizer's temporaries. Not counted: what exists before the step (weights, AdamW
state, the process's own footprint) and library scratch buffers that are not tensors (oneDNN workspaces,
gloo's buffers). "x CP1" divides the largest per-rank peak by the CP=1 peak of the same configuration.

The VAE has the CogVideoX structure (4 blocks, temporal compression 4, latent channels 16, the decoder's
spatial norms) at reduced widths (`--widths`, `--layers-per-block`), because the full widths do not fit on a
CPU machine at 161 x 256^2. LPIPS is off (loss.perceptual_weight=0: it needs weight files). The GAN is off
unless `--gan on|both` (loss.gan_start_step=0 then, discriminator vae_train.disc_dim / disc_max_dim from
`--disc-dim`, vae_train.disc_frame_num from `--disc-frame-num`). The discriminator judges windows of
disc_frame_num frames (the frames after frame 0), each CP rank its own windows, so every rank must hold whole
windows: 161 frames at CP4 leave 40 frames after frame 0 a rank, hence the default 8, used at every CP size so
that all sizes train the same model.

Times are wall seconds of the measured step under the tracking mode, max over ranks; CP ranks share the
machine's cores, so they include waiting on each other and are not a speed measurement of CP.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "distributed"))

from vae_cp import PeakTensorMemory, mib  # noqa: E402


@dataclass(frozen=True)
class Draw:
    """What `VAETrainingClips.read` returns beside the frames (the trainer reads only `.fps`)."""
    fps: float = 8.0


class RandomClips:
    """Stand-in for `VAETrainingClips`: slot -> (uniform noise [3, frames, size, size] in [-1, 1], draw)."""

    def __init__(self, frames: int, size: int):
        self.frames, self.size = frames, size

    def read(self, slot: int):
        import torch

        generator = torch.Generator().manual_seed(slot)
        return torch.rand(3, self.frames, self.size, self.size, generator=generator) * 2 - 1, Draw()


class PeakWithOrigins(PeakTensorMemory):
    """PeakTensorMemory that also remembers, at the peak, which live storages make it up (op, shape, dtype)."""

    def __init__(self):
        super().__init__()
        self.origins: dict[int, tuple] = {}
        self.at_peak: list[tuple] = []
        self.peak_op = ""
        self._op = ""
        self._last_snapshot = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func.overloadpacket.__name__)
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _track(self, tensor) -> None:
        key = tensor.untyped_storage().data_ptr()
        new = key != 0 and key not in self.sizes
        super()._track(tensor)
        if new:
            self.origins[key] = (self._op, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
        # snapshot the live set when the peak has grown by 0.5% since the last snapshot (cheap; close enough)
        if self.peak > self._last_snapshot * 1.005:
            self._last_snapshot = self.peak
            self.peak_op = self._op
            self.at_peak = [(self.sizes[k], *self.origins.get(k, ("?", (), "?"))) for k in self.sizes]

    def _release(self, key: int) -> None:
        super()._release(key)
        if key not in self.sizes:
            self.origins.pop(key, None)

    def largest(self, count: int) -> list[dict]:
        """The `count` largest groups of live storages at the peak, by the op that made them and their shape."""
        groups: dict[tuple, list] = {}
        for size, op, shape, dtype in self.at_peak:
            entry = groups.setdefault((op, shape, dtype), [0, 0])
            entry[0] += size
            entry[1] += 1
        rows = sorted(groups.items(), key=lambda item: -item[1][0])[:count]
        return [{"bytes": b, "count": n, "op": op, "shape": list(shape), "dtype": dtype}
                for (op, shape, dtype), (b, n) in rows]


def run_config(args, gan: bool):
    from cogvx_mega.vae.config import VAEConfig
    from cogvx_mega.vae.losses import VAELossConfig
    from cogvx_mega.vae.train_config import VAERunConfig, VAETrainConfig

    vae = VAEConfig(block_out_channels=tuple(args.widths), layers_per_block=args.layers_per_block,
                    norm_num_groups=args.groups, temporal_compression_ratio=4, sample_height=args.size,
                    sample_width=args.size)
    loss = VAELossConfig(perceptual_weight=0.0, gan_start_step=0 if gan else 10 ** 9)
    train = VAETrainConfig(frames=args.frames, size=args.size, global_batch_size=1, disc_dim=args.disc_dim,
                           disc_max_dim=args.disc_max_dim, disc_frame_num=args.disc_frame_num, device="cpu",
                           steps=2)
    return VAERunConfig(preset="benchmark", vae=vae, loss=loss, vae_train=train).validate()


def measure_rank(rank: int, world_size: int, args, gan: bool, top: int) -> dict:
    import torch

    from cogvx_mega.training.vae_trainer import VAETrainer, build_layout

    torch.set_num_threads(args.threads)
    config = run_config(args, gan)
    layout, cp_group, grad_group = build_layout(config, world_size, "cpu")
    trainer = VAETrainer(config, RandomClips(args.frames, args.size), layout, cp_group, grad_group, "cpu")
    start = time.perf_counter()
    trainer.train_step(0)  # warm-up: AdamW's state exists after it, as in any later step
    warmup = time.perf_counter() - start
    rss_before = _rss()
    tracker = PeakWithOrigins()
    start = time.perf_counter()
    with tracker:
        row = trainer.train_step(1)
    seconds = time.perf_counter() - start
    return {"rank": rank, "peak": tracker.peak, "seconds": seconds, "warmup_seconds": warmup,
            "peak_op": tracker.peak_op, "largest": tracker.largest(top),
            "video_frames": layout.video_frames, "latent_frames": layout.latent_frames,
            "rss_before": rss_before, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "loss": row["loss"], "gan_on": row["gan_on"]}


def _rss() -> int:
    """This process's resident bytes now."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=33, help="1 + 4k video frames")
    parser.add_argument("--size", type=int, default=64, help="height = width in pixels (a multiple of 8)")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="CP sizes (each on its own ranks)")
    parser.add_argument("--widths", type=int, nargs=4, default=[4, 8, 8, 16], help="VAE block_out_channels")
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--groups", type=int, default=4, help="norm_num_groups")
    parser.add_argument("--gan", choices=("off", "on", "both"), default="off",
                        help="the GAN off (loss.gan_start_step=1e9), on from step 0, or both")
    parser.add_argument("--disc-dim", type=int, nargs=2, default=[8, 32], metavar=("DIM", "MAX_DIM"),
                        help="vae_train.disc_dim and disc_max_dim")
    parser.add_argument("--disc-frame-num", type=int, default=8,
                        help="vae_train.disc_frame_num: frames a discriminator window holds (a power of two "
                             "dividing every CP rank's frames after frame 0)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--top", type=int, default=8, help="largest live tensors at the peak to list per CP size")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a CP size may take")
    parser.add_argument("--json", help="write every rank's numbers here")
    args = parser.parse_args()
    args.disc_dim, args.disc_max_dim = args.disc_dim
    # megatron's import-time notice, once per rank
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from launcher import run_ranks

    import torch

    clip_bytes = 3 * args.frames * args.size ** 2 * 4
    print(f"torch {torch.__version__}, clip 1x3x{args.frames}x{args.size}x{args.size} fp32 "
          f"({mib(clip_bytes)} MiB), VAE block_out_channels={tuple(args.widths)} layers_per_block="
          f"{args.layers_per_block} norm_num_groups={args.groups}, LPIPS off, disc_dim {args.disc_dim} / disc_max_dim "
          f"{args.disc_max_dim} / disc_frame_num {args.disc_frame_num}, {args.threads} thread(s) per rank",
          flush=True)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.gan]
    results = []
    for gan in modes:
        for cp in args.cp:
            began = time.perf_counter()
            ranks = run_ranks(cp, measure_rank, args, gan, args.top, timeout=args.timeout)
            results.append({"gan": gan, "cp": cp, "ranks": ranks})
            worst = max(ranks, key=lambda r: r["peak"])
            print(f"  gan {'on' if gan else 'off'} cp {cp}: peak {mib(worst['peak'])} MiB (rank {worst['rank']}), "
                  f"{time.perf_counter() - began:.0f} s in all", flush=True)

    print(f"\n{'GAN':>4} {'cp':>3} {'peak MiB/rank':>14} {'x CP1':>7} {'s/step':>8} {'RSS MiB before':>15} "
          f"{'max RSS MiB':>12}")
    for gan in modes:
        rows = [r for r in results if r["gan"] == gan]
        base = next((max(x["peak"] for x in r["ranks"]) for r in rows if r["cp"] == 1), None)
        for r in rows:
            peak = max(x["peak"] for x in r["ranks"])
            ratio = f"{peak / base:.3f}" if base else "-"
            print(f"{'on' if gan else 'off':>4} {r['cp']:>3} {mib(peak):>14} {ratio:>7} "
                  f"{max(x['seconds'] for x in r['ranks']):>8.1f} {mib(max(x['rss_before'] for x in r['ranks'])):>15} "
                  f"{mib(max(x['maxrss'] for x in r['ranks'])):>12}")
    if args.top:
        for r in results:
            worst = max(r["ranks"], key=lambda x: x["peak"])
            print(f"\nGAN {'on' if r['gan'] else 'off'}, cp {r['cp']}, rank {worst['rank']} "
                  f"({worst['video_frames']} video / {worst['latent_frames']} latent frames): peak "
                  f"{mib(worst['peak'])} MiB reached in {worst['peak_op']}; largest live tensors then:")
            for t in worst["largest"]:
                print(f"  {mib(t['bytes']):>10} MiB = {t['count']:>2} x {t['op']:<26} {t['shape']} {t['dtype']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "clip_bytes": clip_bytes, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
