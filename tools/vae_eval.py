"""`cogvx vae eval --vae V --data MANIFEST`: how well a VAE reconstructs the clips of a manifest.

Each clip is decoded at the asked length, size and rate, passed through the VAE with the posterior mean (no
sampling noise, so two runs agree) and scored with PSNR, SSIM and flicker (`cogvx_mega.vae.metrics`). A clip that
cannot be read, or is shorter than asked, is skipped with its reason and never stops the run: one bad file in a
large manifest should not cost the evaluation of the others.
"""
from __future__ import annotations

import json
import statistics
from typing import Optional

SCORE_NAMES = ("psnr", "ssim", "flicker")


def evaluate_vae(vae_path: str, manifest: str, frames: int, size: int, fps: float = 8.0,
                 clips: Optional[int] = None, device: Optional[str] = None, output: Optional[str] = None,
                 overwrite: bool = False) -> dict:
    """The reconstruction report of the VAE at `vae_path` on the first `clips` clips of `manifest` (all when None),
    each `frames` frames of `size` x `size` pixels at `fps`; written as JSON to `output` when given. Every input is
    checked (a ConfigError naming the flag and the fix) before any clip is decoded or anything written."""
    from cogvx_mega.config.errors import ConfigError, refuse_existing_output
    from cogvx_mega.data.manifest import read_clip_lines
    from cogvx_mega.tools.load import load_vae

    if output is not None:
        refuse_existing_output("--output", output, overwrite)
    if clips is not None and (isinstance(clips, bool) or not isinstance(clips, int) or clips < 1):
        raise ConfigError("--clips", clips, "must be a positive number of clips, or left out for all of them")
    records = read_clip_lines(manifest, flag="--data")[:clips]
    device = device or default_device()
    vae = load_vae(vae_path, device=device)
    check_clip_shape(frames, size, fps, vae.config)
    report = {"vae": vae_path, "data": manifest, "frames": frames, "size": size, "fps": fps, "clips": [],
              "skipped": []}
    for record in records:
        scores, reason = score_clip(vae, record, frames, size, fps, device)
        if reason is None:
            report["clips"].append({"path": record["path"], **scores})
        else:
            report["skipped"].append({"path": record["path"], "reason": reason})
    if not report["clips"]:
        raise ConfigError("--data", manifest, f"no clip is usable: {why_none_usable(report['skipped'], frames, fps)}")
    report["mean"] = {name: statistics.fmean(row[name] for row in report["clips"]) for name in SCORE_NAMES}
    if output is not None:
        from cogvx_mega.checkpoint.atomic import write_text_atomically

        write_text_atomically(output, json.dumps(report, indent=2) + "\n")
    return report


def default_device() -> str:
    """The first GPU when there is one: a VAE on a CPU is slow but still right."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_clip_shape(frames: int, size: int, fps: float, vae_config) -> None:
    """`frames` is 1 + k * the VAE's temporal ratio and `size` a positive multiple of its spatial ratio (the shapes
    its encoder maps to whole latent frames and pixels), and `fps` a positive rate."""
    from cogvx_mega.config.errors import ConfigError

    temporal, spatial = vae_config.temporal_compression_ratio, vae_config.spatial_compression_ratio
    if not is_positive_int(frames) or (frames - 1) % temporal:
        below = 1 + temporal * max(0, (int(frames) - 1) // temporal) if is_positive_int(frames) else 1
        raise ConfigError("--frames", frames, f"must be 1 + {temporal}k for this VAE (temporal compression "
                                              f"{temporal}), e.g. {below} or {below + temporal}")
    if not is_positive_int(size) or size % spatial:
        below = spatial * max(1, int(size) // spatial) if is_positive_int(size) else spatial
        raise ConfigError("--size", size, f"must be a positive multiple of {spatial} for this VAE (spatial "
                                          f"compression {spatial}), e.g. {below} or {below + spatial}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ConfigError("--fps", fps, "must be a positive frame rate, e.g. 8")


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def score_clip(vae, record: dict, frames: int, size: int, fps: float, device: str) -> tuple[dict, Optional[str]]:
    """({psnr, ssim, flicker}, None) for a usable clip, ({}, why) for one that is skipped."""
    import torch

    from cogvx_mega.data.decode import DecodeSpec, decode_clip
    from cogvx_mega.data.manifest import MediaError
    from cogvx_mega.vae.metrics import ReconstructionScores

    spec = DecodeSpec(frames=frames, height=size, width=size, fps=fps,
                      temporal_compression_ratio=vae.config.temporal_compression_ratio)
    try:
        video = decode_clip(record, spec)
    except MediaError as error:
        return {}, f"unreadable: {error}"
    if video.shape[1] < frames:
        return {}, f"too short: {video.shape[1]} frames at {fps:g} fps, fewer than {frames}"
    with torch.no_grad():
        reconstruction = reconstruct(vae, video[None].to(device))
    scores = ReconstructionScores.of(video[None], reconstruction.cpu())
    return {name: getattr(scores, name) for name in SCORE_NAMES}, None


def reconstruct(vae, batch):
    """The decoded posterior mean of `batch` [B, 3, T, H, W], clamped to [-1, 1] as a saved video would be."""
    return vae.decode(vae.encode(batch)).clamp(-1, 1)


def why_none_usable(skipped: list[dict], frames: int, fps: float) -> str:
    """One phrase for a manifest with no usable clip: all too short, or how many were unreadable."""
    short = sum(item["reason"].startswith("too short") for item in skipped)
    if short == len(skipped):
        return f"every clip is shorter than {frames} frames at {fps:g} fps; pass fewer --frames or a lower --fps"
    first_bad = next(item for item in skipped if not item["reason"].startswith("too short"))
    return (f"{short} shorter than {frames} frames at {fps:g} fps, {len(skipped) - short} unreadable (first: "
            f"{first_bad['path']}: {first_bad['reason']})")


def format_table(report: dict) -> str:
    """A plain-text table of a report from `evaluate_vae`: one row per clip and a mean row, then the skipped count."""
    rows = [(row["path"], row) for row in report["clips"]] + [("mean", report["mean"])]
    width = max(len("clip"), *(len(name) for name, _ in rows))
    lines = [f"{'clip':<{width}}  {'psnr (dB)':>9}  {'ssim':>6}  {'flicker':>8}"]
    for name, scores in rows:
        lines.append(f"{name:<{width}}  {scores['psnr']:>9.2f}  {scores['ssim']:>6.4f}  {scores['flicker']:>8.5f}")
    if report["skipped"]:
        lines.append(f"skipped {len(report['skipped'])} clip(s); the report lists each with its reason")
    return "\n".join(lines)
