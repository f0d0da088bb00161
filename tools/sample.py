"""`cogvx sample`: a video from a checkpoint, a VAE and a prompt (or prompt embeddings).

Checks every input before anything heavy runs or anything is written: the checkpoint and the VAE must agree
on latent channels, the frame count must be 1 + 4k, `--prompt` needs `--text-encoder`, and an existing output is
refused without `--overwrite`. The denoising loop is `cogvx_mega.diffusion.sampler` (DDIM or DPM-Solver++, as
diffusers' CogVideoX schedulers), the latents are drawn from `--seed` as diffusers' pipelines draw them, and the
VAE decodes in chunks of `--chunk-frames` latent frames on one device. Image-to-video models take the first
frame with `--image`. Under torchrun the transformer runs at the `--tp x --pp x --cp` layout (every rank loads
only its part of the checkpoint) and the VAE decode splits time over the ranks; rank 0 writes the files.
What the pipelines do around the loop is `cogvx_mega.training.sampling`, shared with samples during training.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from cogvx_mega.config.errors import (ConfigError, check_frame_count, check_writable, parse_size,
                                      refuse_existing_output)
from cogvx_mega.config.training import DiffusionConfig

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
    from cogvx_mega.checkpoint.meta import read_checkpoint_meta

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


def run_sample(args) -> list[str]:
    """Everything `cogvx sample` does; returns the files written (rank 0 writes them under torchrun)."""
    import torch.distributed as dist

    from cogvx_mega.diffusion.sampler import SCHEDULERS, SamplingSettings
    from cogvx_mega.diffusion.schedule import schedule_from_config
    from cogvx_mega.training.sampling import decode_video, denoise, latent_grid
    from cogvx_mega.vae import io

    outputs = [args.output] + ([str(Path(args.output).with_suffix(".gif"))] if args.gif else []) + (
        [args.save_latents] if args.save_latents else [])
    for flag, path in zip(["--output"] * (len(outputs) - bool(args.save_latents)) + ["--save-latents"], outputs):
        refuse_existing_output(flag, path, args.overwrite)
        check_writable(flag, path)  # before the model, the VAE and the denoise
    check_frame_count("--frames", args.frames, 4)
    height, width = parse_size("--size", args.size)
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
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    model_config, forward = _sampling_model(args, device, dtype)
    m = model_config
    vae = load_family_vae(args.vae, "--vae", m, device, dtype, verify=not args.no_verify)
    if m.is_image_to_video and not args.image:
        raise ConfigError("--image", None, f"{args.ckpt} is an image-to-video model: give the first frame with "
                                           f"--image FILE")
    if args.image and not m.is_image_to_video:
        raise ConfigError("--image", args.image[0], "this is a text-to-video model; drop --image")
    prompt_embeds, negative = prompt_embeddings(
        m, device, prompts=args.prompt, text_encoder=args.text_encoder, negative_prompt=args.negative_prompt,
        embeds_file=args.prompt_embeds, negative_file=args.negative_prompt_embeds,
        flags=("--prompt-embeds", "--negative-prompt-embeds"))
    batch = prompt_embeds.shape[0]
    images = first_frames(args.image, batch, height, width, "--image") if args.image else None
    grid = latent_grid(m, args.frames, height, width, vae.config.temporal_compression_ratio,
                       vae.config.spatial_compression_ratio)
    latents = None
    if args.latents:
        latents = read_tensor_file(args.latents, "latents", "--latents")
        if tuple(latents.shape) != grid.shape(batch):
            raise ConfigError("--latents", args.latents, f"latents have shape {tuple(latents.shape)}; --frames "
                                                         f"{args.frames} --size {args.size} need {grid.shape(batch)}")
    schedule = schedule_from_config(diffusion_config_for(args.ckpt))
    settings = SamplingSettings(args.steps, args.guidance, args.dynamic_cfg, args.scheduler)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    writer = not distributed or dist.get_rank() == 0
    latents = denoise(forward, m, vae, grid, prompt_embeds, negative, settings, schedule, args.seed, device,
                      latents=latents, images=images, progress=writer)
    written = []
    if writer:
        for path in outputs:  # the folders checked at the start, created now
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.save_latents and writer:
        io.save_latents(args.save_latents, latents.float())
        written.append(args.save_latents)
    video = decode_video(vae, latents, grid, args.chunk_frames, _decode_group(grid) if distributed else None)
    if writer:
        io.write_video(args.output, video[:1].cpu(), fps=args.fps)
        written.append(args.output)
        if args.gif:
            io.write_gif(outputs[1], video[:1].cpu(), args.fps)
            written.append(outputs[1])
    if distributed:
        dist.barrier()
    return written


def _sampling_model(args, device: str, dtype: torch.dtype):
    """(model config, forward) for --ckpt: the whole model in this process, or under torchrun this rank's part
    of the --tp x --pp x --cp layout, loaded straight from the checkpoint at that layout."""
    from cogvx_mega.tools.load import load_transformer
    from cogvx_mega.training.sampling import layout_forward

    world = int(os.environ.get("WORLD_SIZE", "1"))
    sizes = {"--tp": args.tp, "--pp": args.pp, "--cp": args.cp}
    layout = args.tp * args.pp * args.cp
    if world == 1:
        if layout > 1:
            raise ConfigError("--tp/--pp/--cp", " x ".join(str(v) for v in sizes.values()),
                              f"a layout of {layout} ranks runs under torchrun --nproc-per-node {layout}")
        model = load_transformer(args.ckpt, device=device, dtype=dtype, verify=not args.no_verify,
                                 weights=args.weights)
        return model.model_config, layout_forward([model], dtype)
    if layout != world:
        raise ConfigError("--tp/--pp/--cp", " x ".join(str(v) for v in sizes.values()),
                          f"the layout must use all {world} ranks of torchrun (TP x PP x CP = {world})")
    from cogvx_mega.checkpoint.reader import open_transformer_weights
    from cogvx_mega.config.parallel import ParallelConfig
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.checkpoint import verify_for_job
    from cogvx_mega.training.pretrained import load_pretrained_weights

    if not args.no_verify:  # every rank checksums its share of the files
        verify_for_job(args.ckpt, flag="--ckpt")
    model_config = open_transformer_weights(args.ckpt).model
    model_config.backend = "local"
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              virtual_pipeline_model_parallel_size=args.vpp, context_parallel_size=args.cp,
                              sequence_parallel=args.tp > 1)
    parallel.validate(model_config)
    initialize_parallel(parallel, device=device, seed=args.seed)
    chunks = build_model_chunks(model_config, parallel, device=device)
    load_pretrained_weights(chunks, args.ckpt, model_config, weights_choice=args.weights)
    chunks = [chunk.to(dtype).eval() for chunk in chunks]
    chunks[0].config.pipeline_dtype = dtype  # what the stages send each other
    return model_config, layout_forward(chunks, dtype)


def _decode_group(grid):
    """The ranks that decode together (context parallel in time): as many as the clip's latent frames allow."""
    import torch.distributed as dist

    frames = grid.frames - grid.dropped_frames
    ranks = min(dist.get_world_size(), max(1, (frames - frames % 2) // 2))  # >= 2 latent frames per rank
    return dist.new_group(list(range(ranks))) if ranks > 1 else None


def training_sampler(config):
    """The `TrainingSampler` of a run with training.sample_every: the VAE loaded and the prompts encoded once
    (T5 freed afterwards), every input checked before the run writes anything."""
    from cogvx_mega.training.sampling import SamplePrompts, TrainingSampler

    s, m = config.sampling, config.model
    device = config.training.device
    dtype = torch.bfloat16 if config.training.precision() == "bf16_params" else torch.float32
    vae = load_family_vae(s.vae or config.data.vae, "sampling.vae", m, device, dtype)
    prompt_embeds, negative = prompt_embeddings(
        m, device, prompts=s.prompts, text_encoder=s.text_encoder or config.data.text_encoder, negative_prompt=None,
        embeds_file=s.prompt_embeds, negative_file=s.negative_prompt_embeds,
        flags=("sampling.prompt_embeds", "sampling.negative_prompt_embeds"))
    images = None
    if m.is_image_to_video:
        _, height, width = config.sampling_resolution()
        images = first_frames(s.images, prompt_embeds.shape[0], height, width, "sampling.images")
    return TrainingSampler(config, SamplePrompts(prompt_embeds, negative, images), vae)


# --- inputs shared by `cogvx sample` and samples during training ---------------------------------------------
def load_family_vae(path: str, flag: str, model_config, device: str, dtype: torch.dtype, verify: bool = True):
    """The VAE at `path`, refused when its latents are not the ones the model denoises (another family)."""
    from cogvx_mega.tools.load import load_vae

    vae = load_vae(path, device=device, dtype=dtype, verify=verify)
    if vae.config.latent_channels != model_config.out_channels:
        raise ConfigError(flag, path, f"makes {vae.config.latent_channels}-channel latents; the model denoises "
                                      f"{model_config.out_channels} (another model family)")
    return vae


def prompt_embeddings(model_config, device: str, *, prompts, text_encoder, negative_prompt, embeds_file,
                      negative_file, flags: tuple[str, str]):
    """(prompt embeddings [N, L, D], negative embeddings or None) from prompt texts through the T5 at
    `text_encoder` (negatives: T5(negative_prompt or ""), diffusers' unconditional branch) or from safetensors
    files (no negative file: None, SAT's zeros); a negative file overrides the T5 negatives. Shapes checked."""
    embeds_flag, negative_flag = flags
    negative = None
    if prompts:
        from cogvx_mega.data.text import T5TextEncoder

        encoder = T5TextEncoder(text_encoder, max_length=model_config.max_text_seq_length, device=device)
        prompt_embeds = encoder.encode(list(prompts))
        if not negative_file:
            negative = encoder.encode([negative_prompt or ""] * len(prompts))
        del encoder
    else:
        prompt_embeds = read_tensor_file(embeds_file, "prompt_embeds", embeds_flag)
    if negative_file:
        negative = read_tensor_file(negative_file, "negative_prompt_embeds", negative_flag)
    if prompt_embeds.dim() != 3 or prompt_embeds.shape[2] != model_config.text_embed_dim:
        raise ConfigError(embeds_flag, embeds_file, f"prompt_embeds has shape {tuple(prompt_embeds.shape)}; the "
                                                    f"model takes [N, L, {model_config.text_embed_dim}]")
    if negative is not None and negative.shape != prompt_embeds.shape:
        raise ConfigError(negative_flag, negative_file, f"has shape {tuple(negative.shape)}; the prompts have "
                                                        f"{tuple(prompt_embeds.shape)}")
    return prompt_embeds, negative


def first_frames(paths, batch: int, height: int, width: int, flag: str) -> torch.Tensor:
    """The I2V first frames [batch, 3, H, W]: one image for every prompt, or one per prompt."""
    from cogvx_mega.training.sampling import read_image

    if len(paths) not in (1, batch):
        raise ConfigError(flag, " ".join(paths), f"give one image, or one per prompt ({batch})")
    return torch.stack([read_image(path, height, width, flag) for path in paths]).expand(batch, -1, -1, -1)
