"""`cogvx vae encode|decode|train|eval`: a video file to a latent file or back with the 3D VAE (under torchrun every
rank takes a part of the time axis: context parallel), training the VAE, and its reconstruction scores."""
from __future__ import annotations

import argparse

from cogvx_mega.cli.arguments import add_config_arguments, verbose_parent

NAME = "vae"
HELP = "the 3D VAE: encode a video to latents, decode latents to a video, train it, score its reconstructions"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    for action, help_text in (("encode", "a video file to a latent file"), ("decode", "a latent file to a video")):
        sub = actions.add_parser(action, parents=[verbose_parent()], help=help_text)
        sub.add_argument("input", help="encode: a video file; decode: a latent file (.safetensors)")
        sub.add_argument("output", help="encode: the latent file to write; decode: the video file (.mp4)")
        sub.add_argument("--vae", required=True, help="diffusers AutoencoderKLCogVideoX folder or cogvx-mega VAE "
                                                      "checkpoint")
        sub.add_argument("--frames", type=int, default=None, help="encode only the first N frames (N = 1 + 4k)")
        sub.add_argument("--sample", action="store_true", help="draw from the posterior instead of its mean")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--chunk-frames", type=int, default=None,
                         help="one process: walk time N latent frames at a time (long clips on one GPU)")
        sub.add_argument("--fps", type=float, default=None)
        sub.add_argument("--device", choices=("cpu", "cuda"), default=None)
        sub.add_argument("--overwrite", action="store_true")

    train = actions.add_parser("train", parents=[verbose_parent()],
                               help="train the VAE: L1 + LPIPS + KL, then a 3D-discriminator GAN; data x context "
                                    "parallel under torchrun")
    add_config_arguments(train)  # --preset tiny|cogvideox-2b|..., --config, section.field=value
    train.add_argument("--data", required=True, help="a manifest of clips (cogvx data scan)")
    train.add_argument("--run-dir", required=True, help="metrics.jsonl, config.yaml and checkpoints/ go here")
    train.add_argument("--steps", type=int, default=None, help="train up to this step (vae_train.steps)")
    train.add_argument("--cp", type=int, default=1, help="context-parallel size: ranks that split each clip's time "
                                                         "axis (the rest of the torchrun world is data parallel)")
    train.add_argument("--resume", default=None, help="'auto' (the run's newest checkpoint that verifies, if any) or "
                                                      "a checkpoints/step_* folder")
    train.add_argument("--init-from", default=None, help="start from these VAE weights: a diffusers "
                                                         "AutoencoderKLCogVideoX folder, a VAE checkpoint or a VAE "
                                                         "training step (the previous stage)")
    train.add_argument("--dry-run", action="store_true", help="run every check and print the plan (layout, clips, "
                                                              "model sizes); nothing is trained or written")

    evaluate = actions.add_parser("eval", parents=[verbose_parent()],
                                  help="PSNR, SSIM and flicker of the VAE's reconstructions of a manifest's clips")
    evaluate.add_argument("--vae", required=True, help="diffusers VAE folder, VAE checkpoint or VAE training step")
    evaluate.add_argument("--data", required=True, help="a manifest of clips (cogvx data scan)")
    evaluate.add_argument("--frames", type=int, default=17, help="frames per clip (1 + 4k)")
    evaluate.add_argument("--size", type=int, default=256, help="clips are resized and centre-cropped to SIZE^2")
    evaluate.add_argument("--fps", type=float, default=8.0)
    evaluate.add_argument("--clips", type=int, default=None, help="the first N clips of the manifest (default all)")
    evaluate.add_argument("--output", default=None, help="also write the report as JSON here")
    evaluate.add_argument("--device", choices=("cpu", "cuda"), default=None)
    evaluate.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        return _train(args)
    if args.action == "eval":
        return _evaluate(args)
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


def _train(args: argparse.Namespace) -> int:
    from cogvx_mega.vae.train_config import load_vae_run_config
    from cogvx_mega.run.vae_training import train_vae

    config = load_vae_run_config(args.preset, args.config_file, args.overrides)
    train_vae(config, args.data, args.run_dir, cp=args.cp, resume=args.resume, init_from=args.init_from,
              steps=args.steps, dry_run=args.dry_run)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from cogvx_mega.tools.vae_eval import evaluate_vae, format_table

    report = evaluate_vae(args.vae, args.data, args.frames, args.size, fps=args.fps, clips=args.clips,
                          device=args.device, output=args.output, overwrite=args.overwrite)
    print(format_table(report))
    if args.output is None:
        print(json.dumps(report["mean"]))
    return 0
