"""`cogvx vae encode|decode`: a video file to a latent file (.safetensors) or back with the 3D VAE. Launched by
torchrun with more than one rank, every rank takes a part of the time axis (context parallel over the world
group) and rank 0 writes the file; in one process `chunk_frames` walks time a few latent frames at a time."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from cogvx_mega.config.errors import ConfigError, refuse_existing_output


def _setup(output: str, overwrite: bool, chunk_frames: Optional[int], device: Optional[str], vae_path: str):
    """(vae, device, process group or None, whether this rank writes), every check first: OUTPUT is not in the
    way, is a file path and its folder takes new files before the VAE loads."""
    from cogvx_mega.tools.load import load_vae

    refuse_existing_output("OUTPUT", output, overwrite)
    if chunk_frames is not None and chunk_frames < 1:
        raise ConfigError("--chunk-frames", chunk_frames, "use a positive number of latent frames")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    group = world_group(device)
    if group is not None and chunk_frames is not None:
        raise ConfigError("--chunk-frames", chunk_frames, "chunked mode is for one process; under torchrun time is "
                                                          "split over the ranks instead")
    vae = load_vae(vae_path, device=device)
    return vae, device, group, group is None or torch.distributed.get_rank() == 0


def world_group(device: str):
    """The world group when launched by torchrun with more than one rank (all ranks split time), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    from cogvx_mega.parallel.state import init_torch_distributed

    init_torch_distributed(device)
    return dist.group.WORLD


@torch.no_grad()
def encode_video_file(video_path: str, output: str, vae_path: str, frames: Optional[int] = None,
                      sample: bool = False, seed: int = 0, chunk_frames: Optional[int] = None,
                      device: Optional[str] = None, overwrite: bool = False) -> Optional[str]:
    """The VAE latents (before the latent scale; the posterior mean, or a draw from `seed` with `sample`) of the
    first `frames` frames of a video; returns the file written (None on the ranks that do not write)."""
    from cogvx_mega.vae import io

    vae, device, group, writer = _setup(output, overwrite, chunk_frames, device, vae_path)
    video, fps = io.read_video(video_path, frames)
    latents = vae.encode(video.to(device), sample=sample, chunk_frames=chunk_frames, group=group, gather=True,
                         generator=torch.Generator(device).manual_seed(seed) if sample else None)
    if not writer:
        return None
    Path(output).parent.mkdir(parents=True, exist_ok=True)  # checked at the start, created once there is a result
    io.save_latents(output, latents, {"fps": fps, "frames": video.shape[2], "scaling_factor": vae.config.scaling_factor,
                                      "scaled": False, "vae": os.path.abspath(vae_path)})
    return output


@torch.no_grad()
def decode_latent_file(latent_path: str, output: str, vae_path: str, chunk_frames: Optional[int] = None,
                       fps: Optional[float] = None, device: Optional[str] = None,
                       overwrite: bool = False) -> Optional[str]:
    """The video of a latent file (as `encode_video_file` writes it), at `fps` or the file's own."""
    from cogvx_mega.vae import io

    vae, device, group, writer = _setup(output, overwrite, chunk_frames, device, vae_path)
    latents, metadata = io.load_latents(latent_path)
    video = vae.decode(latents.to(device=device, dtype=torch.float32), chunk_frames=chunk_frames, group=group,
                       gather=True)
    if not writer:
        return None
    Path(output).parent.mkdir(parents=True, exist_ok=True)  # checked at the start, created once there is a result
    io.write_video(output, video.cpu(), fps=fps or metadata.get("fps", 8.0))
    return output
