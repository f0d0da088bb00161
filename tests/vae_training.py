"""What the VAE training tests make for themselves: random LPIPS weight files in the real files' layouts
(torchvision's vgg16 `features.<i>.*`, the lpips package's `lin<k>.model.1.weight`) and a manifest of short
moving-shape clips."""
from __future__ import annotations

from pathlib import Path

import torch


def lpips_files(folder: Path, seed: int = 0) -> tuple[str, str]:
    from cogvx_mega.vae.lpips import LPIPS

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    module = LPIPS()
    with torch.no_grad():
        for lin in module.lins:  # the package's trained lin weights are non-negative
            lin.model[1].weight.uniform_(0.0, 1.0)
    state = module.state_dict()
    vgg = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": v for k, v in state.items() if k.startswith("net.")}
    torch.save(vgg, folder / "vgg16.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin") and not k.startswith("lins")}, folder / "vgg.pth")
    return str(folder / "vgg16.pth"), str(folder / "vgg.pth")


def clip_manifest(folder: Path, clips: int = 4, frames: int = 24, fps: int = 16, height: int = 40,
                  width: int = 48, short: int = 0) -> str:
    """A manifest of `clips` moving-square H.264 clips (and `short` 3-frame ones)."""
    from media import moving_square, write_video

    from cogvx_mega.data.manifest import ClipRecord, probe_media, write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_video(folder / f"clip_{i}.mp4", moving_square(frames, height, width, seed=i), fps, "libx264",
                         "yuv420p") for i in range(clips)]
    paths += [write_video(folder / f"short_{i}.mp4", moving_square(3, height, width, seed=50 + i), fps, "libx264",
                          "yuv420p") for i in range(short)]
    records = [ClipRecord(path=str(p), caption="a moving square", **probe_media(p)) for p in paths]
    write_manifest(records, folder / "clips.jsonl")
    return str(folder / "clips.jsonl")
