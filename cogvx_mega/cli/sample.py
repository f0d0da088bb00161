"""`cogvx sample`: a video from a checkpoint, a VAE and a prompt (or prompt embeddings); under torchrun the
transformer runs at --tp x --pp x --cp and the VAE decode splits time over the ranks (tools/sample.py)."""
from __future__ import annotations

import argparse

NAME = "sample"
HELP = "make a video with a checkpoint (DDIM / DPM-Solver++, classifier-free guidance)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="a cogvx-mega checkpoint (any layout) or a diffusers folder")
    parser.add_argument("--weights", choices=("ema", "model"), default=None,
                        help="the checkpoint's moving average of the weights (training.ema_decay) or its weights "
                             "(default: the average when the checkpoint has one)")
    parser.add_argument("--vae", required=True, help="diffusers AutoencoderKLCogVideoX folder or cogvx-mega VAE")
    parser.add_argument("--prompt", nargs="+", help="prompt text (one or more), with --text-encoder")
    parser.add_argument("--negative-prompt", default=None, help="with --prompt: the negative prompt (default '')")
    parser.add_argument("--text-encoder", help="local T5 folder (tokenizer and encoder, or a pipeline folder)")
    parser.add_argument("--prompt-embeds", help="safetensors with prompt_embeds [B, L, D]")
    parser.add_argument("--negative-prompt-embeds", help="safetensors with negative_prompt_embeds [B, L, D] "
                                                         "(default zeros, SAT's unconditional branch)")
    parser.add_argument("--latents", help="safetensors with the initial latents [B, T, C, H, W]")
    parser.add_argument("--image", nargs="+", help="image-to-video models: the first frame (one image, or one per "
                                                   "prompt), resized to --size")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scheduler", default="dpm", choices=("ddim", "dpm"))
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--dynamic-cfg", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--frames", type=int, default=49, help="pixel frames, 1 + 4k")
    parser.add_argument("--size", default="480x720", help="HEIGHTxWIDTH in pixels")
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--output", required=True, help="the MP4 to write")
    parser.add_argument("--gif", action="store_true", help="also write OUTPUT with .gif")
    parser.add_argument("--save-latents", help="also write the final latents (before the VAE) as latents")
    parser.add_argument("--chunk-frames", type=int, default=None, help="VAE decode N latent frames at a time")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--tp", type=int, default=1, help="under torchrun: tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="under torchrun: pipeline-parallel size")
    parser.add_argument("--vpp", type=int, default=None, help="under torchrun: virtual pipeline stages per rank")
    parser.add_argument("--cp", type=int, default=1, help="under torchrun: context-parallel size")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-verify", action="store_true",
                        help="read --ckpt and --vae without checking its files' sizes and CRC32C (a damaged one is "
                             "refused otherwise)")


def run(args: argparse.Namespace) -> int:
    from cogvx_mega.tools.sample import run_sample

    for path in run_sample(args):
        print(f"wrote {path}")
    return 0
