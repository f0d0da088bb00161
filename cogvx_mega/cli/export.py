"""`cogvx export diffusers|lora`: a release from a checkpoint (tools/export.py)."""
from __future__ import annotations

import argparse

NAME = "export"
HELP = "write a release: a diffusers pipeline folder (diffusers), or a LoRA's adapters (lora)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=("diffusers", "lora"))
    parser.add_argument("--ckpt", required=True, help="a cogvx-mega checkpoint (any layout) or a diffusers folder")
    parser.add_argument("--vae", help="diffusers: AutoencoderKLCogVideoX folder or cogvx-mega VAE")
    parser.add_argument("--text-encoder", help="diffusers: local T5 folder (tokenizer and encoder)")
    parser.add_argument("--out", required=True, help="the folder to write (a pipeline folder, or a LoRA folder)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out when it holds a previous export of the same kind (it has "
                             "cogvx_export.json) or is empty; any other existing path is refused and kept")
    parser.add_argument("--weights", choices=("ema", "model"), default=None,
                        help="diffusers: the checkpoint's moving average of the weights (training.ema_decay) or its "
                             "weights (default: the average when the checkpoint has one)")
    parser.add_argument("--no-verify", action="store_true",
                        help="read --ckpt and --vae without checking its files' sizes and CRC32C (a damaged one is "
                             "refused otherwise)")


def run(args: argparse.Namespace) -> int:
    from cogvx_mega.config.errors import ConfigError
    from cogvx_mega.tools.export import refuse_unsafe_output

    # --out before anything is read: what is there may be replaced, and its folder takes new files
    refuse_unsafe_output(args.out, args.overwrite, args.format)
    if args.format == "lora":
        from cogvx_mega.tools.export import export_lora

        print(f"wrote {export_lora(args.ckpt, args.out, args.overwrite, verify=not args.no_verify)}")
        return 0
    from cogvx_mega.tools.export import export_diffusers

    for flag, value in (("--vae", args.vae), ("--text-encoder", args.text_encoder)):
        if not value:
            raise ConfigError(flag, value, "`cogvx export diffusers` writes a whole pipeline and needs it")
    written = export_diffusers(args.ckpt, args.vae, args.text_encoder, args.out, args.dtype, args.overwrite,
                               verify=not args.no_verify, weights=args.weights)
    print(f"wrote {written}")
    return 0
