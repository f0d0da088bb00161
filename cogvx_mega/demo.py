"""`cogvx demo`: the whole loop on a CPU in about two minutes, through the real data path.

1. write moving-shape clips as H.264 files with caption sidecars into <run>/media;
2. scan them into <run>/manifest.jsonl (`cogvx data scan`);
3. make a tiny random VAE and T5 (nothing downloads) and encode the clips into the latent cache
   <run>/cache.zarr (`cogvx data encode`);
4. train the `tiny` preset from the cache, single process, logging metrics.jsonl;
5. convert the final weights to a diffusers transformer folder and (when diffusers is installed) check
   that diffusers' CogVideoXTransformer3DModel loaded from it gives our output;
6. plot the loss curve to <run>/loss.png and print the summary.
The run folder is started afresh each time.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def plot_loss_curve(history: list[dict], path: Path, window: int = 20) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in history]
    losses = torch.tensor([m["loss"] for m in history])
    smooth = [losses[max(0, i - window + 1): i + 1].mean().item() for i in range(len(losses))]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    axis.plot(steps, losses.tolist(), color="#9bb7d4", linewidth=0.8, label="loss per step")
    axis.plot(steps, smooth, color="#1f4e79", linewidth=2.0, label=f"mean of last {window} steps")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("v-prediction MSE")
    axis.set_title("cogvx demo: tiny CogVideoX on synthetic moving shapes (CPU)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def check_with_diffusers(diffusers_dir: Path, model, config) -> float | None:
    """Max |ours - diffusers| on one random input, or None when diffusers is not installed."""
    try:
        from diffusers import CogVideoXTransformer3DModel
    except ImportError:
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    reference = CogVideoXTransformer3DModel.from_pretrained(str(diffusers_dir)).eval()
    m, d = config.model, config.data
    frames, height, width = d.latent_shape(m)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, frames, m.in_channels, height, width, generator=generator)
    text = torch.randn(1, m.max_text_seq_length, m.text_embed_dim, generator=generator)
    timesteps = torch.tensor([500])
    grid = (height // m.patch_size, width // m.patch_size)
    rope = get_3d_rotary_pos_embed(m.attention_head_dim, ((0, 0), grid), grid, frames)  # sample size: full grid
    with torch.no_grad():
        theirs = reference(latents, text, timesteps, image_rotary_emb=rope, return_dict=False)[0]
        ours = model.eval()(latents, text, timesteps)
    return (theirs - ours).abs().max().item()


DEMO_CLIPS = 24


def write_demo_clips(folder: Path, count: int, config) -> None:
    """Moving shapes at 24 fps, long enough for the config's frame count at data.fps, as H.264 files."""
    from cogvx_mega.data.synthetic import random_clip_spec, render_clip_uint8, write_video_file

    folder.mkdir(parents=True, exist_ok=True)
    d = config.data
    source_frames = int((d.num_frames - 1) * 24 / d.fps) + 1
    generator = torch.Generator().manual_seed(config.training.seed)
    for index in range(count):
        spec = random_clip_spec(generator)
        pixels = render_clip_uint8(spec, source_frames, d.height, d.width)
        write_video_file(folder / f"clip_{index:03d}.mp4", pixels, 24, "libx264", "yuv420p")
        (folder / f"clip_{index:03d}.txt").write_text(spec.caption + "\n")


def run_demo(run_dir: str = "runs/demo", steps: int = 300) -> dict:
    import shutil

    from cogvx_mega.checkpoint.transformer import write_diffusers_folder
    from cogvx_mega.data.manifest import find_media, scan, write_manifest
    from cogvx_mega.config import load_config
    from cogvx_mega.data.synthetic import COLOURS, DIRECTIONS, SHAPES, SPEEDS
    from cogvx_mega.data.tiny_models import make_tiny_t5, make_tiny_vae
    from cogvx_mega.run.training import prepare_training
    from cogvx_mega.tools.data_encode import encode_manifest

    run = Path(run_dir)
    shutil.rmtree(run, ignore_errors=True)
    config = load_config("tiny", overrides=[f"training.run_dir='{run}'", f"training.steps={steps}",
                                            "training.device=cpu"])
    d = config.data
    print(f"[1/6] writing {DEMO_CLIPS} H.264 clips of moving shapes ({d.height}x{d.width}, 24 fps) to {run / 'media'}")
    write_demo_clips(run / "media", DEMO_CLIPS, config)
    print("[2/6] scanning them into a manifest")
    records, failures = scan(find_media(run / "media"), workers=2, progress=False)
    assert not failures, failures  # every generated clip is readable
    write_manifest(records, run / "manifest.jsonl")
    print("[3/6] encoding them with a tiny random VAE and T5 into a latent cache")
    vocabulary = [" ".join(words) for words in (COLOURS, SHAPES, DIRECTIONS, SPEEDS)]
    make_tiny_t5(run / "models" / "t5", d_model=config.model.text_embed_dim, captions=vocabulary * 20)
    make_tiny_vae(run / "models" / "vae", latent_channels=config.model.in_channels)
    encode_manifest(config, str(run / "manifest.jsonl"), str(run / "models" / "vae"), str(run / "models" / "t5"),
                    str(run / "cache.zarr"), shard_clips=8, device="cpu")
    config.data.source = str(run / "cache.zarr")

    print(f"[4/6] training preset 'tiny' for {steps} steps on CPU from the cache")
    training = prepare_training(config)  # the same setup as `cogvx train` (it writes the resolved config)
    dataset, model = training.dataset, training.trainer.model
    history = training.fit()
    checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]

    print(f"[5/6] converting {checkpoint} to diffusers format")
    diffusers_dir = write_diffusers_folder(model.state_dict(), config.model, str(run / "diffusers"))
    max_diff = check_with_diffusers(diffusers_dir, model, config)

    print("[6/6] plotting the loss curve")
    png = plot_loss_curve(history, run / "loss.png")
    window = max(1, min(20, len(history) // 4))
    first = sum(m["loss"] for m in history[:window]) / window
    last = sum(m["loss"] for m in history[-window:]) / window
    summary = {"clips": len(dataset), "steps": len(history), "loss_first": first, "loss_last": last,
               "cache": str(run / "cache.zarr"), "checkpoint": str(checkpoint), "diffusers": str(diffusers_dir),
               "diffusers_max_abs_diff": max_diff, "loss_curve": str(png)}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"loss: {first:.4f} (mean of first {window} steps) -> {last:.4f} (mean of last {window})")
    print(f"checkpoint: {checkpoint}\ndiffusers folder: {diffusers_dir}")
    if max_diff is None:
        print("diffusers not installed: skipped the reload check (pip install diffusers to run it)")
    else:
        print(f"diffusers reload check: max |ours - diffusers| = {max_diff:.2e}")
    print(f"loss curve: {png}")
    return summary
