"""`cogvx sample`: a video from a checkpoint, a VAE and a prompt (or prompt embeddings).

Checks every input before anything heavy runs or anything is written: the checkpoint and the VAE must agree
on latent channels, the frame count must be 1 + 4k, `--prompt` needs `--text-encoder`, and an existing output is
refused without `--overwrite`. The denoising loop is `cogvx_mega.diffusion.sampler` (DDIM or DPM-Solver++, as
diffusers' CogVideoX schedulers), the latents are drawn from `--seed` as diffusers' pipelines draw them, and the
VAE decodes in chunks of `--chunk-frames` latent frames on one device, or context parallel under torchrun.
Not built yet: image-to-video conditioning, and the transformer under TP/CP (issue 12).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..config.schema import ConfigError, DiffusionConfig, check_frame_count

logger = logging.getLogger(__name__)

EMBEDDING_KEYS = ("prompt_embeds", "negative_prompt_embeds", "latents")


def read_tensor_file(path: str, key: str, flag: str) -> torch.Tensor:
    """Tensor `key` of a safetensors file (`--prompt-embeds`, `--negative-prompt-embeds`, `--latents`)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ConfigError(flag, path, "no such file")
    try:
        with safe_open(path, framework="pt") as handle:
            if key not in handle.keys():
                raise ConfigError(flag, path, f"has no tensor {key!r} (it has {', '.join(handle.keys()) or 'none'})")
            return handle.get_tensor(key).float()
    except ConfigError:
        raise
    except Exception as error:  # safetensors raises several types for a foreign file
        raise ConfigError(flag, path, f"is not a safetensors file ({error})") from None


def diffusion_config_for(ckpt: str) -> DiffusionConfig:
    """The schedule the checkpoint was trained with: a training checkpoint's recorded diffusion config, or a
    diffusers pipeline's scheduler config beside the transformer folder; else the defaults."""
    from ..checkpoint.meta import read_checkpoint_meta

    defaults = DiffusionConfig()
    try:
        recorded = read_checkpoint_meta(ckpt).get("diffusion")
    except Exception:  # a diffusers folder has no project meta
        recorded = None
    if recorded:
        known = {k: v for k, v in recorded.items() if k in DiffusionConfig.__dataclass_fields__}
        return DiffusionConfig(**known)
    for candidate in (Path(ckpt) / "scheduler", Path(ckpt).parent / "scheduler"):
        config_file = candidate / "scheduler_config.json"
        if config_file.is_file():
            values = json.loads(config_file.read_text())
            return DiffusionConfig(snr_shift_scale=float(values.get("snr_shift_scale", defaults.snr_shift_scale)),
                                   zero_terminal_snr=bool(values.get("rescale_betas_zero_snr", True)))
    logger.info("no training record or scheduler config beside %s: the default schedule (SNR shift %s)", ckpt,
                defaults.snr_shift_scale)
    return defaults


def write_gif(path: str, video: torch.Tensor, fps: float) -> None:
    """[1, 3, T, H, W] in [-1, 1] as an animated GIF (PyAV, 8-bit RGB palette), written atomically."""
    import uuid

    import av

    frames = ((video[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    target = Path(path)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}.gif"
    try:
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream("gif", rate=max(1, round(fps)))
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb8"
            for array in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def run_sample(args) -> list[str]:
    """Everything `cogvx sample` does; returns the files written."""
    from .load import load_transformer, load_vae
    from ..diffusion.sampler import SCHEDULERS, SamplingSettings, sample_latents
    from ..diffusion.schedule import schedule_from_config
    from ..vae import io

    outputs = [args.output] + ([str(Path(args.output).with_suffix(".gif"))] if args.gif else []) + (
        [args.save_latents] if args.save_latents else [])
    for path in outputs:
        if os.path.exists(path) and not args.overwrite:
            raise ConfigError("--output", path, "already exists; pass --overwrite or another path")
    check_frame_count("--frames", args.frames, 4)
    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ConfigError("--size", args.size, "write HEIGHTxWIDTH in pixels, e.g. 480x720") from None
    if height % 16 or width % 16:
        raise ConfigError("--size", args.size, "height and width must be multiples of 16 (VAE 8x, patch 2)")
    if args.scheduler not in SCHEDULERS:
        raise ConfigError("--scheduler", args.scheduler, f"choose one of {', '.join(SCHEDULERS)}")
    if args.prompt and not args.text_encoder:
        raise ConfigError("--prompt", " ".join(args.prompt), "needs --text-encoder T5DIR (a local T5 folder), or "
                                                             "pass --prompt-embeds FILE instead")
    if not args.prompt and not args.prompt_embeds:
        raise ConfigError("--prompt", None, "give --prompt TEXT (with --text-encoder) or --prompt-embeds FILE")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_transformer(args.ckpt, device=device)
    m = model.model_config
    if m.ofs_embed_dim or m.in_channels != m.out_channels:
        raise ConfigError("--ckpt", args.ckpt, "is an image-to-video model; image conditioning is not built into "
                                               "`cogvx sample` yet")
    vae = load_vae(args.vae, device=device)
    if vae.config.latent_channels != m.in_channels:
        raise ConfigError("--vae", args.vae, f"makes {vae.config.latent_channels}-channel latents; the checkpoint "
                                             f"takes {m.in_channels} (another model family)")
    if args.prompt:
        from ..data.text import T5TextEncoder

        encoder = T5TextEncoder(args.text_encoder, max_length=m.max_text_seq_length, device=device)
        prompt_embeds = encoder.encode(list(args.prompt))
        negative = encoder.encode([args.negative_prompt or ""] * len(args.prompt))  # diffusers: T5("")
    else:
        prompt_embeds = read_tensor_file(args.prompt_embeds, "prompt_embeds", "--prompt-embeds")
        negative = (read_tensor_file(args.negative_prompt_embeds, "negative_prompt_embeds",
                                     "--negative-prompt-embeds") if args.negative_prompt_embeds else None)  # SAT: 0
    if prompt_embeds.dim() != 3 or prompt_embeds.shape[2] != m.text_embed_dim:
        raise ConfigError("--prompt-embeds", args.prompt_embeds, f"prompt_embeds has shape "
                                                                 f"{tuple(prompt_embeds.shape)}; the model takes "
                                                                 f"[B, L, {m.text_embed_dim}]")
    batch = prompt_embeds.shape[0]
    shape = (batch, (args.frames - 1) // 4 + 1, m.in_channels, height // 8, width // 8)
    generator = torch.Generator().manual_seed(args.seed)
    if args.latents:
        latents = read_tensor_file(args.latents, "latents", "--latents")
        if tuple(latents.shape) != shape:
            raise ConfigError("--latents", args.latents, f"latents have shape {tuple(latents.shape)}; --frames "
                                                         f"{args.frames} --size {args.size} need {shape}")
    else:
        latents = torch.randn(shape, generator=generator)  # as the pipelines' prepare_latents draws them
    schedule = schedule_from_config(diffusion_config_for(args.ckpt))
    settings = SamplingSettings(args.steps, args.guidance, args.dynamic_cfg, args.scheduler)
    latents = sample_latents(model, latents.to(device), prompt_embeds.to(device),
                             negative.to(device) if negative is not None else None, settings, schedule,
                             progress=True, generator=generator)
    written = []
    if args.save_latents:
        from safetensors.torch import save_file

        tmp = Path(args.save_latents).with_name(f".{Path(args.save_latents).name}.tmp")
        save_file({"latents": latents.cpu().contiguous()}, str(tmp))
        os.replace(tmp, args.save_latents)
        written.append(args.save_latents)
    with torch.no_grad():
        video = vae.decode((latents / vae.config.scaling_factor).permute(0, 2, 1, 3, 4).float(),
                           chunk_frames=args.chunk_frames)  # [B, 3, F, H, W]
    io.write_video(args.output, video[:1].cpu(), fps=args.fps)
    written.append(args.output)
    if args.gif:
        write_gif(outputs[1], video[:1].cpu(), args.fps)
        written.append(outputs[1])
    return written


def add_sample_arguments(parser) -> None:
    parser.add_argument("--ckpt", required=True, help="a cogvx-mega checkpoint (any layout) or a diffusers folder")
    parser.add_argument("--vae", required=True, help="diffusers AutoencoderKLCogVideoX folder or cogvx-mega VAE")
    parser.add_argument("--prompt", nargs="+", help="prompt text (one or more), with --text-encoder")
    parser.add_argument("--negative-prompt", default=None, help="with --prompt: the negative prompt (default '')")
    parser.add_argument("--text-encoder", help="local T5 folder (tokenizer and encoder, or a pipeline folder)")
    parser.add_argument("--prompt-embeds", help="safetensors with prompt_embeds [B, L, D]")
    parser.add_argument("--negative-prompt-embeds", help="safetensors with negative_prompt_embeds [B, L, D] "
                                                         "(default zeros, SAT's unconditional branch)")
    parser.add_argument("--latents", help="safetensors with the initial latents [B, T, C, H, W]")
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
    parser.add_argument("--overwrite", action="store_true")
