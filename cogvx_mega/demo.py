"""`cogvx demo`: the whole loop on a CPU in a few minutes.

1. generate the synthetic moving-shapes dataset (latents + text embeddings) into <run>/data;
2. train the `tiny` preset on it, single process, logging metrics.jsonl;
3. save a checkpoint, convert it to a diffusers transformer folder, and (when diffusers is
   installed) check that diffusers' CogVideoXTransformer3DModel loaded from it gives our output;
4. plot the loss curve to <run>/loss.png and print the summary.
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


def run_demo(run_dir: str = "runs/demo", steps: int = 300) -> dict:
    from .config import load_config, write_resolved_config
    from .data.latent_dataset import LatentDataset, synthetic_dataset_for
    from .model.transformer import build_model_chunks
    from .parallel.state import initialize_parallel
    from .checkpoint.transformer import write_diffusers_folder
    from .training.trainer import Trainer

    run = Path(run_dir)
    config = load_config("tiny", overrides=[f"training.run_dir='{run}'", f"training.steps={steps}",
                                            "data.source=synthetic", "training.device=cpu"])
    print(f"[1/4] generating {config.data.num_synthetic_clips} synthetic clips "
          f"({config.data.num_frames} frames, {config.data.height}x{config.data.width})")
    dataset = synthetic_dataset_for(config)
    data_dir = dataset.save(str(run / "data"))
    config.data.source = str(data_dir)
    dataset = LatentDataset.load(str(data_dir))
    write_resolved_config(config, str(run))
    metrics_file = run / "metrics.jsonl"
    if metrics_file.exists():
        metrics_file.unlink()

    print(f"[2/4] training preset 'tiny' for {steps} steps on CPU")
    dims = initialize_parallel(config.parallel, device="cpu", seed=config.training.seed)
    (model,) = build_model_chunks(config.model, config.parallel, device="cpu", seed=config.training.seed)
    trainer = Trainer(config, dims, [model], dataset, run_dir=str(run))
    history = trainer.fit()
    checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]

    print(f"[3/4] converting {checkpoint} to diffusers format")
    diffusers_dir = write_diffusers_folder(model.state_dict(), config.model, str(run / "diffusers"))
    max_diff = check_with_diffusers(diffusers_dir, model, config)

    print("[4/4] plotting the loss curve")
    png = plot_loss_curve(history, run / "loss.png")
    window = max(1, min(20, len(history) // 4))
    first = sum(m["loss"] for m in history[:window]) / window
    last = sum(m["loss"] for m in history[-window:]) / window
    summary = {"steps": len(history), "loss_first": first, "loss_last": last, "checkpoint": str(checkpoint),
               "diffusers": str(diffusers_dir), "diffusers_max_abs_diff": max_diff, "loss_curve": str(png)}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"loss: {first:.4f} (mean of first {window} steps) -> {last:.4f} (mean of last {window})")
    print(f"checkpoint: {checkpoint}\ndiffusers folder: {diffusers_dir}")
    if max_diff is None:
        print("diffusers not installed: skipped the reload check (pip install diffusers to run it)")
    else:
        print(f"diffusers reload check: max |ours - diffusers| = {max_diff:.2e}")
    print(f"loss curve: {png}")
    return summary
