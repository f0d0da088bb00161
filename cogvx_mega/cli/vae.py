"""`cogvx vae encode|decode`: a video file to a latent file or back with the 3D VAE; under torchrun every rank
takes a part of the time axis (context parallel)."""
from __future__ import annotations

import argparse

NAME = "vae"
HELP = "encode a video to latents or decode latents to a video with the 3D VAE"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("encode", "decode"))
    parser.add_argument("input", help="encode: a video file; decode: a latent file (.safetensors)")
    parser.add_argument("output", help="encode: the latent file to write; decode: the video file (.mp4)")
    parser.add_argument("--vae", required=True, help="diffusers AutoencoderKLCogVideoX folder or cogvx-mega VAE "
                                                     "checkpoint")
    parser.add_argument("--frames", type=int, default=None, help="encode only the first N frames (N = 1 + 4k)")
    parser.add_argument("--sample", action="store_true", help="draw from the posterior instead of its mean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-frames", type=int, default=None,
                        help="one process: walk time N latent frames at a time (long clips on one GPU)")
    parser.add_argument("--fps", type=float, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    from cogvx_mega.tools.vae_files import decode_latent_file, encode_video_file

    if args.action == "encode":
        written = encode_video_file(args.input, args.output, args.vae, frames=args.frames, sample=args.sample,
                                    seed=args.seed, chunk_frames=args.chunk_frames, device=args.device,
                                    overwrite=args.overwrite)
    else:
        written = decode_latent_file(args.input, args.output, args.vae, chunk_frames=args.chunk_frames,
                                     fps=args.fps, device=args.device, overwrite=args.overwrite)
    if written:  # rank 0 writes under torchrun
        print(f"wrote {written}")
    return 0
