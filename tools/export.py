"""`cogvx export diffusers`: a complete pipeline folder that `diffusers.CogVideoXPipeline.from_pretrained` loads.

    DIR/model_index.json      the pipeline's parts
    DIR/transformer/          the diffusers config and the weights in safetensors shards of at most 5 GB
    DIR/vae/                  the VAE (a diffusers folder is copied as it is read; a project VAE converted)
    DIR/scheduler/            a CogVideoXDPMScheduler config of the training schedule (SNR shift, zero
                              terminal SNR, v-prediction, trailing spacing)
    DIR/tokenizer/, DIR/text_encoder/   copied from the given local T5 folder
    DIR/README.md             a model card: the model and training config, the step, the data

The checkpoint may be a training checkpoint at any layout (read whole, tensor by tensor) or any other accepted
transformer format. The folder is written atomically; an existing one is refused without `--overwrite`.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from cogvx_mega.checkpoint.atomic import atomic_directory
from cogvx_mega.checkpoint.meta import is_project_checkpoint
from cogvx_mega.checkpoint.verify import refuse_damaged
from cogvx_mega.config.errors import ConfigError, refuse_existing_output

logger = logging.getLogger(__name__)

SHARD_BYTES = 5 * 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def write_sharded_safetensors(state: dict, folder: Path, stem: str = "diffusion_pytorch_model",
                              shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Tensors in files of at most `shard_bytes` (one file and no index when they fit), with diffusers' index
    (`{stem}.safetensors.index.json`: total size and the file of every tensor) otherwise."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for key in sorted(state):
        tensor = state[key].contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{stem}.safetensors"))
        return [f"{stem}.safetensors"]
    names, weight_map, total = [], {}, 0
    for number, shard in enumerate(shards, start=1):
        name = f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name))
        names.append(name)
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


def scheduler_config(diffusion) -> dict:
    """diffusers' CogVideoXDPMScheduler config for the schedule the model was trained with."""
    import diffusers

    return {"_class_name": "CogVideoXDPMScheduler", "_diffusers_version": diffusers.__version__,
            "num_train_timesteps": diffusion.num_train_timesteps, "beta_start": diffusion.beta_start,
            "beta_end": diffusion.beta_end, "beta_schedule": "scaled_linear", "trained_betas": None,
            "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "v_prediction",
            "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": diffusion.zero_terminal_snr, "snr_shift_scale": diffusion.snr_shift_scale}


def model_card(model_config, meta: dict, source: str) -> str:
    import dataclasses

    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-video", "tags: [cogvideox, cogvx-mega]", "---",
             "", "# CogVideoX transformer trained with cogvx-mega", "",
             f"Exported from `{source}`" + (f" at training step {meta['step']}." if "step" in meta else "."), ""]
    lines += ["## Model", "", "```json", json.dumps(dataclasses.asdict(model_config), indent=2), "```", ""]
    for section in ("training", "diffusion", "data"):
        if meta.get(section):
            lines += [f"## {section.capitalize()}", "", "```json", json.dumps(meta[section], indent=2), "```", ""]
    if "consumed_samples" in meta:
        lines += [f"Samples seen: {meta['consumed_samples']:,}.", ""]
    return "\n".join(lines)


def export_diffusers(ckpt: str, vae: str, text_encoder: str, out: str, dtype: str = "fp32",
                     overwrite: bool = False, verify: bool = True) -> Path:
    from cogvx_mega.checkpoint.reader import read_transformer_checkpoint
    from cogvx_mega.checkpoint.transformer import diffusers_config_from_model, project_to_diffusers
    from cogvx_mega.checkpoint.vae import read_diffusers_vae_folder, read_vae_checkpoint, write_diffusers_vae_folder
    from cogvx_mega.data.text import t5_parts
    from cogvx_mega.tools.sample import diffusion_config_for

    refuse_existing_output("--out", out, overwrite, what="folder")
    if dtype not in DTYPES:
        raise ConfigError("--dtype", dtype, f"choose one of {', '.join(DTYPES)}")
    for flag, path in (("--ckpt", ckpt), ("--vae", vae)):
        if not Path(path).exists():
            raise ConfigError(flag, path, "no such file or folder")
    tokenizer_dir, encoder_dir = t5_parts(text_encoder)
    vae_config, vae_state = (read_vae_checkpoint(vae, verify) if is_project_checkpoint(vae)
                             else read_diffusers_vae_folder(vae))
    model_config, state, meta = read_transformer_checkpoint(ckpt, refuse_damaged if verify else None)
    if vae_config.latent_channels != model_config.out_channels:
        raise ConfigError("--vae", vae, f"makes {vae_config.latent_channels}-channel latents; the checkpoint's "
                                        f"model works on {model_config.out_channels} (another model family)")
    encoder_width = json.loads((encoder_dir / "config.json").read_text()).get("d_model")
    if encoder_width != model_config.text_embed_dim:
        raise ConfigError("--text-encoder", text_encoder, f"encodes to width {encoder_width}; the model takes "
                                                          f"model.text_embed_dim={model_config.text_embed_dim}")
    diffusion = diffusion_config_for(ckpt)
    weights = {key: value.to(DTYPES[dtype]) for key, value in project_to_diffusers(state, model_config).items()}
    image_to_video = model_config.is_image_to_video
    tokenizer_class = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get(
        "tokenizer_class", "T5Tokenizer") if (tokenizer_dir / "tokenizer_config.json").is_file() else "T5Tokenizer"
    import diffusers

    with atomic_directory(out) as tmp:
        (tmp / "transformer").mkdir()
        (tmp / "transformer" / "config.json").write_text(json.dumps(
            {"_class_name": "CogVideoXTransformer3DModel", "_diffusers_version": diffusers.__version__,
             **diffusers_config_from_model(model_config)}, indent=2))
        write_sharded_safetensors(weights, tmp / "transformer")
        write_diffusers_vae_folder(vae_state, vae_config, str(tmp / "vae"))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(diffusion), indent=2))
        shutil.copytree(tokenizer_dir, tmp / "tokenizer", ignore=shutil.ignore_patterns("corpus.txt"))
        shutil.copytree(encoder_dir, tmp / "text_encoder")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "CogVideoXImageToVideoPipeline" if image_to_video else "CogVideoXPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "CogVideoXDPMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", tokenizer_class], "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLCogVideoX"]}, indent=2))
        (tmp / "README.md").write_text(model_card(model_config, meta, ckpt))
    return Path(out)


def export_lora(ckpt: str, out: str, overwrite: bool = False, verify: bool = True) -> Path:
    """`cogvx export lora`: a LoRA training checkpoint's adapters as `pytorch_lora_weights.safetensors` in the
    PEFT/diffusers names `CogVideoXPipeline.load_lora_weights` reads (scale folded into B)."""
    from cogvx_mega.checkpoint.lora import diffusers_lora_state, lora_scale, read_lora_adapters, write_lora_folder
    from cogvx_mega.checkpoint.reader import check_lora_base
    from cogvx_mega.checkpoint.meta import read_checkpoint_meta
    from cogvx_mega.config.model import model_config_from_dict

    refuse_existing_output("--out", out, overwrite, what="folder")
    if not Path(ckpt).exists():
        raise ConfigError("--ckpt", ckpt, "no such file or folder")
    if verify:  # the adapters read here (and below the base whose fingerprint is compared)
        refuse_damaged(ckpt)
    meta = read_checkpoint_meta(ckpt)
    lora = meta.get("lora")
    if not lora:
        raise ConfigError("--ckpt", ckpt, "is not a LoRA checkpoint (no adapters); `cogvx export diffusers` writes "
                                          "the whole model")
    model = model_config_from_dict(meta["model"])
    base = check_lora_base(lora, model, ckpt)
    if verify and is_project_checkpoint(base):
        refuse_damaged(base)
    if lora.get("base_lora"):
        logger.warning("%s was trained on its base with %s merged; the exported adapters hold only what this run "
                       "learned: load both LoRAs in diffusers", ckpt, lora["base_lora"])
    state = diffusers_lora_state(read_lora_adapters(ckpt, meta), lora_scale(lora), model)
    return write_lora_folder(state, out, {"rank": lora["rank"], "alpha": lora["alpha"], "targets": lora["targets"],
                                          "base": lora["base"], "step": meta.get("step")})
