"""`cogvx export diffusers`: a complete pipeline folder that `diffusers.CogVideoXPipeline.from_pretrained` loads.

    DIR/model_index.json      the pipeline's parts
    DIR/transformer/          the diffusers config and the weights in safetensors shards of at most 5 GB
    DIR/vae/                  the VAE (a diffusers folder is copied as it is read; a project VAE converted)
    DIR/scheduler/            a CogVideoXDPMScheduler config of the training schedule (SNR shift, zero
                              terminal SNR, v-prediction, trailing spacing)
    DIR/tokenizer/, DIR/text_encoder/   copied from the given local T5 folder
    DIR/README.md             a model card: a diffusers usage snippet (with the text length the model was
                              trained with), the step, a summary of the training setup, the full configs
    DIR/cogvx_export.json     the export marker: which tool wrote the folder, from which checkpoint, when

`cogvx export lora` writes DIR/pytorch_lora_weights.safetensors and the same marker.

The checkpoint may be a training checkpoint at any layout (read whole, tensor by tensor) or any other accepted
transformer format. The folder is written atomically, with the process umask's permissions. An existing folder
is refused without `--overwrite`; with it, only a previous export of the same kind (a folder holding the marker)
is replaced, so a mistyped `--out` never deletes anything else.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch

from cogvx_mega.checkpoint.atomic import atomic_directory
from cogvx_mega.checkpoint.meta import is_project_checkpoint
from cogvx_mega.checkpoint.verify import refuse_damaged
from cogvx_mega.config.data import DataConfig
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.training import TrainingConfig
from cogvx_mega.tools.output_marker import OutputMarker, refuse_unsafe_replacement, write_marker

logger = logging.getLogger(__name__)

SHARD_BYTES = 5 * 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXPORT_MARKER = "cogvx_export.json"
MARKER_FORMAT = "cogvx-mega/export-v1"
PRECISIONS = {"fp32": "fp32 throughout", "autocast": "fp32 weights under bf16 autocast",
              "bf16_params": "bf16 weights and compute, fp32 main gradients and master weights"}


# --- the export marker and --overwrite (`output_marker`) -----------------------------------------------------
# diffusers ignores the marker file (`CogVideoXPipeline.from_pretrained` reads model_index.json and the part
# folders; `load_lora_weights` the safetensors file).
EXPORT = OutputMarker(EXPORT_MARKER, MARKER_FORMAT, "export", "cogvx export")


def write_export_marker(folder: Path, kind: str, source: str, step: Optional[int]) -> None:
    """The marker: the kind of export, the source checkpoint (absolute path), its training step (None when
    unknown), with the tool, its version and the time (`output_marker.marker_record`)."""
    write_marker(folder, EXPORT, kind=kind, command=f"cogvx export {kind}", source=str(Path(source).resolve()),
                 step=step)


def refuse_unsafe_output(out: str, overwrite: bool, kind: str) -> None:
    """--out may be replaced only when it holds a previous export of the same kind, or nothing."""
    refuse_unsafe_replacement("--out", out, overwrite, EXPORT, kind=kind)


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


# --- the model card ---------------------------------------------------------------------------------------

def known_fields(cls, values) -> dict:
    """The entries of a recorded config section that `cls` (a config dataclass) still has."""
    return {k: v for k, v in (values or {}).items() if k in cls.__dataclass_fields__}


def trained_video(model_config, meta: dict) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) to sample at: the longest bucket of the data stage the checkpoint's step was
    trained in, from the recorded data config; the model's sample size (8x spatial compression) and 8 fps when
    the checkpoint records none (a diffusers folder)."""
    fallback = (model_config.sample_frames, model_config.sample_height * 8, model_config.sample_width * 8, 8.0)
    if not meta.get("data"):
        return fallback
    try:
        data = DataConfig(**known_fields(DataConfig, meta["data"]))
        stages = data.stage_configs()
        step = meta.get("step") or 0
        stage = next((config for _, end, config in stages if end is None or step < end), stages[-1][2])
        sizes = [tuple(int(v) for v in name.lower().split("x")) for name in stage.bucket_names()]
    except (ConfigError, TypeError, ValueError):
        return fallback
    frames, height, width = max(sizes, key=lambda size: size[0])  # the first of the longest (a video, not an image)
    return frames, height, width, float(data.fps)


def usage_snippet(model_config, meta: dict, folder: str, dtype: str) -> str:
    """Python that loads the exported pipeline with diffusers and makes one video the way the model was trained:
    `max_sequence_length` is the model's text length (diffusers' default of 226 changes the output otherwise)."""
    frames, height, width, fps = trained_video(model_config, meta)
    image_to_video = model_config.is_image_to_video
    pipeline = "CogVideoXImageToVideoPipeline" if image_to_video else "CogVideoXPipeline"
    torch_dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[dtype]
    lines = ["import torch", f"from diffusers import {pipeline}",
             f"from diffusers.utils import export_to_video{', load_image' if image_to_video else ''}", "",
             f"pipe = {pipeline}.from_pretrained({json.dumps(str(folder), ensure_ascii=False)}, "
             f"torch_dtype={torch_dtype})", 'pipe.to("cuda")']
    if image_to_video:
        lines += [f'image = load_image("first_frame.png")  # the first frame ({width} wide, {height} high)']
    lines += ["video = pipe("]
    if image_to_video:
        lines += ["    image=image,"]
    lines += ['    prompt="a red square moving left",', f"    num_frames={frames},", f"    height={height},",
              f"    width={width},", "    num_inference_steps=50,", "    guidance_scale=6.0,",
              f"    max_sequence_length={model_config.max_text_seq_length},",
              "    generator=torch.Generator().manual_seed(42),", ").frames[0]",
              f'export_to_video(video, "output.mp4", fps={fps:g})']
    return "\n".join(lines)


def training_summary(model_config, meta: dict) -> list[str]:
    """Markdown bullet lines of what the checkpoint records of its training (only what it records)."""
    lines = []
    if meta.get("format") == "diffusers":
        return ["- Training step: not recorded (the source is a diffusers folder, which keeps no training history)",
                f"- Text: at most {model_config.max_text_seq_length} T5 tokens a prompt "
                f"(model.max_text_seq_length)"]
    training = meta.get("training") or {}
    step = meta.get("step")
    if step is not None:
        planned = f" of {training['steps']:,} planned" if training.get("steps") else ""
        seen = f" ({meta['consumed_samples']:,} samples seen)" if "consumed_samples" in meta else ""
        lines.append(f"- Training step: {step:,}{planned}{seen}")
    if meta.get("preset"):
        lines.append(f"- Preset: `{meta['preset']}`")
    data = meta.get("data") or {}
    if data:
        lines.append(f"- Data: {data_summary(data)}")
    if "global_batch" in meta:
        unit = "packs" if data.get("packing") else "samples"
        micro = f" (micro batch {training['micro_batch_size']})" if "micro_batch_size" in training else ""
        lines.append(f"- Global batch: {meta['global_batch']:,} {unit} a step{micro}")
    if "lr" in training:
        parts = [f"{training['lr']:g} peak"]
        if "warmup_steps" in training:
            parts.append(f"{training['warmup_steps']:,} warmup steps")
        if "min_lr" in training:
            parts.append(f"cosine down to {training['min_lr']:g}")
        if "weight_decay" in training:
            parts.append(f"weight decay {training['weight_decay']:g}")
        lines.append(f"- Learning rate: {', '.join(parts)}")
    if training:
        try:
            precision = TrainingConfig(**known_fields(TrainingConfig, training)).precision()
        except (TypeError, ValueError):
            precision = None
        if precision in PRECISIONS:
            lines.append(f"- Precision: {precision} ({PRECISIONS[precision]})")
    layout = meta.get("layout") or {}
    if layout:
        lines.append("- Layout: TP {} x PP {} x CP {} x DP {}".format(
            *(layout.get(f"{name}_size", "?") for name in ("tensor_model_parallel", "pipeline_model_parallel",
                                                            "context_parallel", "data_parallel"))))
    lora = meta.get("lora")
    if lora:
        lines.append(f"- LoRA: rank {lora.get('rank')}, alpha {lora.get('alpha')}, targets "
                     f"{', '.join(lora.get('targets') or [])}; merged into its base `{lora.get('base')}`")
    lines.append(f"- Text: at most {model_config.max_text_seq_length} T5 tokens a prompt (model.max_text_seq_length)")
    return lines


def data_summary(data: dict) -> str:
    """One line of a recorded data config: source, buckets (or stages), packing, fps."""
    try:
        config = DataConfig(**known_fields(DataConfig, data))
        stages = config.stage_configs()
    except (ConfigError, TypeError, ValueError):
        return f"source `{data.get('source')}`"
    if len(stages) == 1:
        sizes = f"clips of {', '.join(config.bucket_names())} (frames x height x width)"
    else:
        sizes = "; ".join(f"steps {start:,}-{'end' if end is None else f'{end:,}'}: "
                          f"{', '.join(stage.bucket_names())}" for start, end, stage in stages)
        sizes = f"progressive stages (frames x height x width) {sizes}"
    packing = f", packed up to {config.pack_tokens:,} tokens" if config.packing and config.pack_tokens else ""
    return f"source `{config.source}`, {sizes}{packing}, {config.fps:g} fps"


def model_card(model_config, meta: dict, source: str, folder: str = "path/to/this/folder",
               dtype: str = "fp32") -> str:
    """The README.md of a release: usage, training summary, and the model and recorded configs in full."""
    import dataclasses

    text_length = model_config.max_text_seq_length
    known_step = "step" in meta and meta.get("format") != "diffusers"
    tag = "image-to-video" if model_config.is_image_to_video else "text-to-video"
    lines = ["---", "library_name: diffusers", f"pipeline_tag: {tag}", "tags: [cogvideox, cogvx-mega]", "---",
             "", "# CogVideoX transformer trained with cogvx-mega", "",
             f"Exported from `{source}`" + (f" at training step {meta['step']}." if known_step else "."), ""]
    if meta.get("ema"):
        read = ("the exponential moving average of the weights" if meta.get("weights_read") == "ema" else
                "the trained weights (not their moving average, which the checkpoint also holds)")
        lines += [f"Weights: {read}; training.ema_decay={meta['ema']['decay']}, ema_start_step="
                  f"{meta['ema']['start_step']}.", ""]
    default = ("the same as diffusers' default" if text_length == 226 else
               "diffusers' default is 226, which changes the output")
    size = ("the size it was trained at (the longest bucket of the data stage of its last step)"
            if meta.get("data") else "the model's sample size (the checkpoint records no training data)")
    lines += ["## Usage", "", f"The model was trained on prompts of at most {text_length} T5 tokens: pass "
              f"`max_sequence_length={text_length}` to the pipeline ({default}). The video below has {size}.",
              "", "```python", usage_snippet(model_config, meta, folder, dtype), "```", ""]
    lines += ["## Training summary", "", *training_summary(model_config, meta), ""]
    lines += ["## Model", "", "```json", json.dumps(dataclasses.asdict(model_config), indent=2), "```", ""]
    for section in ("training", "diffusion", "data"):
        if meta.get(section):
            lines += [f"## {section.capitalize()}", "", "```json", json.dumps(meta[section], indent=2), "```", ""]
    return "\n".join(lines)


def export_diffusers(ckpt: str, vae: str, text_encoder: str, out: str, dtype: str = "fp32",
                     overwrite: bool = False, verify: bool = True, weights: Optional[str] = None) -> Path:
    from cogvx_mega.checkpoint.reader import read_transformer_checkpoint
    from cogvx_mega.checkpoint.transformer import diffusers_config_from_model, project_to_diffusers
    from cogvx_mega.checkpoint.vae import read_vae_weights, write_diffusers_vae_folder
    from cogvx_mega.data.text import t5_parts
    from cogvx_mega.tools.sample import diffusion_config_for

    refuse_unsafe_output(out, overwrite, "diffusers")
    if dtype not in DTYPES:
        raise ConfigError("--dtype", dtype, f"choose one of {', '.join(DTYPES)}")
    for flag, path in (("--ckpt", ckpt), ("--vae", vae)):
        if not Path(path).exists():
            raise ConfigError(flag, path, "no such file or folder")
    tokenizer_dir, encoder_dir = t5_parts(text_encoder)
    vae_config, vae_state = read_vae_weights(vae, verify)
    model_config, state, meta = read_transformer_checkpoint(ckpt, refuse_damaged if verify else None, weights)
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
        (tmp / "README.md").write_text(model_card(model_config, meta, ckpt, out, dtype))
        write_export_marker(tmp, "diffusers", ckpt, meta.get("step") if meta.get("format") != "diffusers" else None)
    return Path(out)


def export_lora(ckpt: str, out: str, overwrite: bool = False, verify: bool = True) -> Path:
    """`cogvx export lora`: a LoRA training checkpoint's adapters as `pytorch_lora_weights.safetensors` in the
    PEFT/diffusers names `CogVideoXPipeline.load_lora_weights` reads (scale folded into B)."""
    from cogvx_mega.checkpoint.lora import diffusers_lora_state, lora_scale, read_lora_adapters, write_lora_folder
    from cogvx_mega.checkpoint.reader import check_lora_base
    from cogvx_mega.checkpoint.meta import read_checkpoint_meta
    from cogvx_mega.config.model import model_config_from_dict

    refuse_unsafe_output(out, overwrite, "lora")
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
    header = {"rank": lora["rank"], "alpha": lora["alpha"], "targets": lora["targets"], "base": lora["base"],
              "step": meta.get("step")}
    return write_lora_folder(state, out, header,
                             also=lambda tmp: write_export_marker(tmp, "lora", ckpt, meta.get("step")))
