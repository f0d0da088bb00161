"""Checkpoint converters: diffusers transformer folder <-> project checkpoint, SAT checkpoint -> project.

Each direction is an exact, templated key map plus three special cases (REFERENCE §4):
- QKV: diffusers keeps to_q / to_k / to_v; megatron's fused `linear_qkv` interleaves them per head
  ([q_h; k_h; v_h] for each head h). SAT fuses them as [Q; K; V] blocks.
- the two 6-way modulations of a diffusers block (norm1.linear, norm2.linear) are one 12-way
  `adaln_modulation.linear` here; SAT stores one 12-way matrix in another chunk order.
- learned positions exist only for the rope+learned family.
Every conversion ends with a strict check: missing, unexpected or mis-shaped tensors are one clear error.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from cogvx_mega.config.schema import ModelConfig


class ConversionError(ValueError):
    """A checkpoint that does not fit the expected family or format."""


# --- configs ---------------------------------------------------------------------------------------------

def model_config_from_diffusers(cfg: dict) -> ModelConfig:
    if cfg.get("_class_name") not in (None, "CogVideoXTransformer3DModel"):
        raise ConversionError(f"config.json describes {cfg.get('_class_name')!r}, not a CogVideoXTransformer3DModel")
    if cfg.get("use_rotary_positional_embeddings", False):
        positional = "rope+learned" if cfg.get("use_learned_positional_embeddings", False) else "rope"
    else:
        positional = "sincos"
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise ConversionError(f"activation_fn={cfg['activation_fn']!r} is not CogVideoX's gelu-approximate")
    heads, head_dim = cfg.get("num_attention_heads", 30), cfg.get("attention_head_dim", 64)
    return ModelConfig(
        num_layers=cfg.get("num_layers", 30), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=cfg.get("in_channels", 16), out_channels=cfg.get("out_channels") or 16,
        time_embed_dim=cfg.get("time_embed_dim", 512), ofs_embed_dim=cfg.get("ofs_embed_dim"),
        text_embed_dim=cfg.get("text_embed_dim", 4096), max_text_seq_length=cfg.get("max_text_seq_length", 226),
        patch_size=cfg.get("patch_size", 2), patch_size_t=cfg.get("patch_size_t"),
        patch_bias=cfg.get("patch_bias", True), sample_frames=cfg.get("sample_frames", 49),
        sample_height=cfg.get("sample_height", 60), sample_width=cfg.get("sample_width", 90),
        temporal_compression_ratio=cfg.get("temporal_compression_ratio", 4), positional_embedding=positional,
        spatial_interpolation_scale=cfg.get("spatial_interpolation_scale", 1.875),
        temporal_interpolation_scale=cfg.get("temporal_interpolation_scale", 1.0),
        norm_eps=cfg.get("norm_eps", 1e-5),
    )


def diffusers_config_from_model(model: ModelConfig) -> dict:
    return {
        "_class_name": "CogVideoXTransformer3DModel",
        "_diffusers_version": "0.42.1",
        "activation_fn": "gelu-approximate", "attention_bias": True,
        "attention_head_dim": model.attention_head_dim, "dropout": 0.0, "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": model.in_channels, "max_text_seq_length": model.max_text_seq_length,
        "norm_elementwise_affine": True, "norm_eps": model.norm_eps,
        "num_attention_heads": model.num_attention_heads, "num_layers": model.num_layers,
        "ofs_embed_dim": model.ofs_embed_dim, "out_channels": model.out_channels,
        "patch_bias": model.patch_bias, "patch_size": model.patch_size, "patch_size_t": model.patch_size_t,
        "sample_frames": model.sample_frames, "sample_height": model.sample_height,
        "sample_width": model.sample_width,
        "spatial_interpolation_scale": model.spatial_interpolation_scale,
        "temporal_compression_ratio": model.temporal_compression_ratio,
        "temporal_interpolation_scale": model.temporal_interpolation_scale,
        "text_embed_dim": model.text_embed_dim, "time_embed_dim": model.time_embed_dim,
        "timestep_activation_fn": "silu",
        "use_learned_positional_embeddings": model.positional_embedding == "rope+learned",
        "use_rotary_positional_embeddings": model.uses_rope,
    }


# --- the fused QKV layout --------------------------------------------------------------------------------

def fuse_qkv_per_head(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """[H*d, ...] x3 -> megatron's [H*(q_h, k_h, v_h), ...] (weights [out, in] or biases [out])."""
    stacked = torch.stack([t.reshape(heads, -1, *t.shape[1:]) for t in (q, k, v)], dim=1)  # [H, 3, d, ...]
    return stacked.reshape(-1, *q.shape[1:]).clone()


def split_qkv_per_head(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    per_head = qkv.reshape(heads, 3, -1, *qkv.shape[1:])  # [H, 3, d, ...]
    return tuple(per_head[:, i].reshape(-1, *qkv.shape[1:]).clone() for i in range(3))


# --- diffusers <-> project key maps ---------------------------------------------------------------------

# project key template -> diffusers key template; `{i}` is the layer index.
_DIRECT_TOP = {
    "patch_embed.proj.weight": "patch_embed.proj.weight",
    "patch_embed.proj.bias": "patch_embed.proj.bias",
    "patch_embed.text_proj.weight": "patch_embed.text_proj.weight",
    "patch_embed.text_proj.bias": "patch_embed.text_proj.bias",
    "patch_embed.pos_embedding": "patch_embed.pos_embedding",
    "time_embedding.linear_1.weight": "time_embedding.linear_1.weight",
    "time_embedding.linear_1.bias": "time_embedding.linear_1.bias",
    "time_embedding.linear_2.weight": "time_embedding.linear_2.weight",
    "time_embedding.linear_2.bias": "time_embedding.linear_2.bias",
    "ofs_embedding.linear_1.weight": "ofs_embedding.linear_1.weight",
    "ofs_embedding.linear_1.bias": "ofs_embedding.linear_1.bias",
    "ofs_embedding.linear_2.weight": "ofs_embedding.linear_2.weight",
    "ofs_embedding.linear_2.bias": "ofs_embedding.linear_2.bias",
    "decoder.final_layernorm.weight": "norm_final.weight",
    "decoder.final_layernorm.bias": "norm_final.bias",
    "output_norm_linear.weight": "norm_out.linear.weight",
    "output_norm_linear.bias": "norm_out.linear.bias",
    "output_norm.weight": "norm_out.norm.weight",
    "output_norm.bias": "norm_out.norm.bias",
    "output_proj.weight": "proj_out.weight",
    "output_proj.bias": "proj_out.bias",
}
_DIRECT_LAYER = {
    "input_layernorm.{p}": "norm1.norm.{p}",
    "pre_mlp_layernorm.{p}": "norm2.norm.{p}",
    "self_attention.q_layernorm.{p}": "attn1.norm_q.{p}",
    "self_attention.k_layernorm.{p}": "attn1.norm_k.{p}",
    "self_attention.linear_proj.{p}": "attn1.to_out.0.{p}",
    "mlp.linear_fc1.{p}": "ff.net.0.proj.{p}",
    "mlp.linear_fc2.{p}": "ff.net.2.{p}",
}
_PROJECT_LAYER = "decoder.layers.{i}."
_DIFFUSERS_LAYER = "transformer_blocks.{i}."


def project_keys(model: ModelConfig) -> set[str]:
    """Exactly the tensors a project state dict of this config holds."""
    keys = {k for k in _DIRECT_TOP if _top_key_applies(k, model)}
    for i in range(model.num_layers):
        prefix = _PROJECT_LAYER.format(i=i)
        for template in _DIRECT_LAYER:
            keys.update(prefix + template.format(p=p) for p in ("weight", "bias"))
        keys.update(prefix + f"self_attention.linear_qkv.{p}" for p in ("weight", "bias"))
        keys.update(prefix + f"adaln_modulation.linear.{p}" for p in ("weight", "bias"))
    return keys


def _top_key_applies(key: str, model: ModelConfig) -> bool:
    if key == "patch_embed.pos_embedding":
        return model.positional_embedding == "rope+learned"
    if key.startswith("ofs_embedding."):
        return model.ofs_embed_dim is not None
    if key == "patch_embed.proj.bias":
        return model.patch_bias or model.patch_size_t is not None
    return True


def diffusers_to_project(state: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    source = dict(state)
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        try:
            return source.pop(key)
        except KeyError:
            raise ConversionError(f"diffusers checkpoint is missing {key!r}: it does not match this model family "
                                  f"({model.num_layers} layers, positions={model.positional_embedding})") from None

    for ours, theirs in _DIRECT_TOP.items():
        if _top_key_applies(ours, model):
            out[ours] = take(theirs)
    heads = model.num_attention_heads
    for i in range(model.num_layers):
        ours, theirs = _PROJECT_LAYER.format(i=i), _DIFFUSERS_LAYER.format(i=i)
        for our_t, their_t in _DIRECT_LAYER.items():
            for p in ("weight", "bias"):
                out[ours + our_t.format(p=p)] = take(theirs + their_t.format(p=p))
        for p in ("weight", "bias"):
            q, k, v = (take(f"{theirs}attn1.to_{n}.{p}") for n in "qkv")
            out[f"{ours}self_attention.linear_qkv.{p}"] = fuse_qkv_per_head(q, k, v, heads)
            out[f"{ours}adaln_modulation.linear.{p}"] = torch.cat(
                [take(f"{theirs}norm1.linear.{p}"), take(f"{theirs}norm2.linear.{p}")], dim=0)
    if source:
        raise ConversionError(f"diffusers checkpoint has {len(source)} tensors this model family does not use, "
                              f"e.g. {sorted(source)[:3]}: check the config (layers, positions, ofs)")
    return out


def project_to_diffusers(state: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    check_project_state(state, model)
    out: dict[str, Tensor] = {}
    for ours, theirs in _DIRECT_TOP.items():
        if _top_key_applies(ours, model):
            out[theirs] = state[ours].clone()
    hidden, heads = model.hidden_size, model.num_attention_heads
    for i in range(model.num_layers):
        ours, theirs = _PROJECT_LAYER.format(i=i), _DIFFUSERS_LAYER.format(i=i)
        for our_t, their_t in _DIRECT_LAYER.items():
            for p in ("weight", "bias"):
                out[theirs + their_t.format(p=p)] = state[ours + our_t.format(p=p)].clone()
        for p in ("weight", "bias"):
            q, k, v = split_qkv_per_head(state[f"{ours}self_attention.linear_qkv.{p}"], heads)
            out[f"{theirs}attn1.to_q.{p}"], out[f"{theirs}attn1.to_k.{p}"], out[f"{theirs}attn1.to_v.{p}"] = q, k, v
            modulation = state[f"{ours}adaln_modulation.linear.{p}"]
            out[f"{theirs}norm1.linear.{p}"] = modulation[: 6 * hidden].clone()
            out[f"{theirs}norm2.linear.{p}"] = modulation[6 * hidden:].clone()
    return out


def check_project_state(state: dict[str, Tensor], model: ModelConfig,
                        reference: Optional[dict] = None) -> None:
    """Strict check of a project state dict: keys, and shapes against `reference` (tensors or torch.Size)."""
    expected = project_keys(model)
    present = {k for k in state if not k.endswith("_extra_state")}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ConversionError(f"project checkpoint does not match the model config: missing {missing[:3]} "
                              f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")
    if reference is not None:
        for key in expected:
            wanted = tuple(getattr(reference[key], "shape", reference[key]))
            if tuple(state[key].shape) != wanted:
                raise ConversionError(f"{key}: checkpoint shape {tuple(state[key].shape)} != model shape "
                                      f"{wanted}; the weights are from another model size")


# --- SAT -> project --------------------------------------------------------------------------------------

SAT_PREFIX = "model.diffusion_model."
# SAT state-dict entries that are not transformer weights: the VAE, the text encoder, and
# position buffers that are recomputed here.
_SAT_IGNORED = re.compile(r"^(first_stage_model\.|conditioner\.|model_ema\.|"
                          r"model\.diffusion_model\.mixins\.pos_embed\.(freqs_sin|freqs_cos))")
# SAT's 12 modulation chunks in diffusers' order (norm1 ‖ norm2), REFERENCE §4.
_SAT_MODULATION_ORDER = (0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11)


def sat_to_project(state: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    source = {k: v for k, v in state.items() if not _SAT_IGNORED.match(k)}
    if not any(k.startswith(SAT_PREFIX) for k in source):
        raise ConversionError(f"no '{SAT_PREFIX}*' tensors: this is not a SAT CogVideoX transformer checkpoint")
    if model.positional_embedding != "rope+learned":
        source.pop(SAT_PREFIX + "mixins.pos_embed.pos_embedding", None)  # a fixed sin-cos buffer in SAT 2B

    def take(key: str) -> Tensor:
        try:
            return source.pop(SAT_PREFIX + key)
        except KeyError:
            raise ConversionError(f"SAT checkpoint is missing {SAT_PREFIX + key!r}: it does not match this model "
                                  f"family ({model.num_layers} layers, positions={model.positional_embedding})") from None

    top = {
        "patch_embed.proj.weight": "mixins.patch_embed.proj.weight",
        "patch_embed.proj.bias": "mixins.patch_embed.proj.bias",
        "patch_embed.text_proj.weight": "mixins.patch_embed.text_proj.weight",
        "patch_embed.text_proj.bias": "mixins.patch_embed.text_proj.bias",
        "patch_embed.pos_embedding": "mixins.pos_embed.pos_embedding",
        "time_embedding.linear_1.weight": "time_embed.0.weight", "time_embedding.linear_1.bias": "time_embed.0.bias",
        "time_embedding.linear_2.weight": "time_embed.2.weight", "time_embedding.linear_2.bias": "time_embed.2.bias",
        "ofs_embedding.linear_1.weight": "ofs_embed.0.weight", "ofs_embedding.linear_1.bias": "ofs_embed.0.bias",
        "ofs_embedding.linear_2.weight": "ofs_embed.2.weight", "ofs_embedding.linear_2.bias": "ofs_embed.2.bias",
        "decoder.final_layernorm.weight": "transformer.final_layernorm.weight",
        "decoder.final_layernorm.bias": "transformer.final_layernorm.bias",
        "output_norm_linear.weight": "mixins.final_layer.adaLN_modulation.1.weight",
        "output_norm_linear.bias": "mixins.final_layer.adaLN_modulation.1.bias",
        "output_norm.weight": "mixins.final_layer.norm_final.weight",
        "output_norm.bias": "mixins.final_layer.norm_final.bias",
        "output_proj.weight": "mixins.final_layer.linear.weight",
        "output_proj.bias": "mixins.final_layer.linear.bias",
    }
    layer = {
        "input_layernorm.{p}": "transformer.layers.{i}.input_layernorm.{p}",
        "pre_mlp_layernorm.{p}": "transformer.layers.{i}.post_attention_layernorm.{p}",
        "self_attention.q_layernorm.{p}": "mixins.adaln_layer.query_layernorm_list.{i}.{p}",
        "self_attention.k_layernorm.{p}": "mixins.adaln_layer.key_layernorm_list.{i}.{p}",
        "self_attention.linear_proj.{p}": "transformer.layers.{i}.attention.dense.{p}",
        "mlp.linear_fc1.{p}": "transformer.layers.{i}.mlp.dense_h_to_4h.{p}",
        "mlp.linear_fc2.{p}": "transformer.layers.{i}.mlp.dense_4h_to_h.{p}",
    }
    out: dict[str, Tensor] = {}
    for ours, theirs in top.items():
        if _top_key_applies(ours, model):
            out[ours] = take(theirs)
    heads = model.num_attention_heads
    for i in range(model.num_layers):
        prefix = _PROJECT_LAYER.format(i=i)
        for our_t, their_t in layer.items():
            for p in ("weight", "bias"):
                out[prefix + our_t.format(p=p)] = take(their_t.format(i=i, p=p))
        for p in ("weight", "bias"):
            q, k, v = take(f"transformer.layers.{i}.attention.query_key_value.{p}").chunk(3, dim=0)
            out[f"{prefix}self_attention.linear_qkv.{p}"] = fuse_qkv_per_head(q, k, v, heads)
            chunks = take(f"mixins.adaln_layer.adaLN_modulations.{i}.1.{p}").chunk(12, dim=0)
            out[f"{prefix}adaln_modulation.linear.{p}"] = torch.cat([chunks[j] for j in _SAT_MODULATION_ORDER])
    if model.positional_embedding == "rope+learned" and out["patch_embed.pos_embedding"].dim() == 2:
        out["patch_embed.pos_embedding"] = out["patch_embed.pos_embedding"][None]
    if source:
        raise ConversionError(f"SAT checkpoint has {len(source)} tensors this model family does not use, "
                              f"e.g. {sorted(source)[:3]}: check --preset")
    return out


def read_sat_state(path: str) -> dict[str, Tensor]:
    """A SAT checkpoint: a `.pt` file, or a SAT folder (`latest` names the iteration folder)."""
    location = Path(path)
    if location.is_dir():
        latest = location / "latest"
        iteration = latest.read_text().strip() if latest.is_file() else None
        candidates = sorted((location / iteration).glob("mp_rank_00_model_states.pt")) if iteration else []
        candidates = candidates or sorted(location.glob("**/mp_rank_00_model_states.pt"))
        if not candidates:
            raise ConversionError(f"{path}: no mp_rank_00_model_states.pt found; pass a SAT checkpoint folder or .pt")
        location = candidates[-1]
    if not location.is_file():
        raise ConversionError(f"{path}: no such SAT checkpoint file or folder")
    blob = torch.load(location, map_location="cpu", weights_only=False)
    state = blob.get("module", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise ConversionError(f"{location}: not a SAT state dict")
    return state


# --- diffusers folders ------------------------------------------------------------------------------------

def read_diffusers_folder(path: str) -> tuple[ModelConfig, dict[str, Tensor]]:
    folder = Path(path)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"  # a whole pipeline folder
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path}: no config.json; pass a diffusers transformer folder")
    model = model_config_from_diffusers(json.loads(config_file.read_text()))
    return model, read_diffusers_weights(folder)


def read_diffusers_weights(folder: Path) -> dict[str, Tensor]:
    """A diffusers model folder's weights: sharded or single safetensors, or a .bin."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(folder / shard)))
    elif (folder / "diffusion_pytorch_model.safetensors").is_file():
        state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    elif (folder / "diffusion_pytorch_model.bin").is_file():
        state = torch.load(folder / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConversionError(f"{folder}: no diffusion_pytorch_model weights found")
    return state


def write_diffusers_folder(state: dict[str, Tensor], model: ModelConfig, path: str) -> Path:
    """Write a diffusers transformer folder atomically (a temporary sibling, then rename)."""
    from safetensors.torch import save_file

    from cogvx_mega.training.checkpoint import atomic_directory

    with atomic_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(diffusers_config_from_model(model), indent=2))
        save_file({k: v.contiguous() for k, v in project_to_diffusers(state, model).items()},
                  str(tmp / "diffusion_pytorch_model.safetensors"))
    return Path(path)


ConverterFn = Callable[[dict[str, Tensor], ModelConfig], dict[str, Tensor]]


def expected_shapes(model: ModelConfig) -> dict[str, torch.Size]:
    """Shape of every tensor of a project state dict for `model`, without building the model."""
    hidden, time_dim = model.hidden_size, model.time_embed_dim
    ffn = model.ffn_hidden_size or 4 * hidden
    patch_volume = model.patch_size**2 * (model.patch_size_t or 1)
    shapes = {
        "patch_embed.text_proj.weight": (hidden, model.text_embed_dim), "patch_embed.text_proj.bias": (hidden,),
        "patch_embed.proj.bias": (hidden,),
        "time_embedding.linear_1.weight": (time_dim, hidden), "time_embedding.linear_1.bias": (time_dim,),
        "time_embedding.linear_2.weight": (time_dim, time_dim), "time_embedding.linear_2.bias": (time_dim,),
        "decoder.final_layernorm.weight": (hidden,), "decoder.final_layernorm.bias": (hidden,),
        "output_norm_linear.weight": (2 * hidden, time_dim), "output_norm_linear.bias": (2 * hidden,),
        "output_norm.weight": (hidden,), "output_norm.bias": (hidden,),
        "output_proj.weight": (patch_volume * model.out_channels, hidden),
        "output_proj.bias": (patch_volume * model.out_channels,),
    }
    if model.patch_size_t is None:
        shapes["patch_embed.proj.weight"] = (hidden, model.in_channels, model.patch_size, model.patch_size)
    else:
        shapes["patch_embed.proj.weight"] = (hidden, model.in_channels * patch_volume)
    if model.positional_embedding == "rope+learned":
        frames = (model.sample_frames - 1) // model.temporal_compression_ratio + 1
        tokens = frames * (model.sample_height // model.patch_size) * (model.sample_width // model.patch_size)
        shapes["patch_embed.pos_embedding"] = (1, model.max_text_seq_length + tokens, hidden)
    if model.ofs_embed_dim:
        ofs = model.ofs_embed_dim
        shapes.update({"ofs_embedding.linear_1.weight": (ofs, ofs), "ofs_embedding.linear_1.bias": (ofs,),
                       "ofs_embedding.linear_2.weight": (ofs, ofs), "ofs_embedding.linear_2.bias": (ofs,)})
    per_layer = {
        "input_layernorm.weight": (hidden,), "input_layernorm.bias": (hidden,),
        "pre_mlp_layernorm.weight": (hidden,), "pre_mlp_layernorm.bias": (hidden,),
        "adaln_modulation.linear.weight": (12 * hidden, time_dim), "adaln_modulation.linear.bias": (12 * hidden,),
        "self_attention.linear_qkv.weight": (3 * hidden, hidden), "self_attention.linear_qkv.bias": (3 * hidden,),
        "self_attention.q_layernorm.weight": (model.attention_head_dim,),
        "self_attention.q_layernorm.bias": (model.attention_head_dim,),
        "self_attention.k_layernorm.weight": (model.attention_head_dim,),
        "self_attention.k_layernorm.bias": (model.attention_head_dim,),
        "self_attention.linear_proj.weight": (hidden, hidden), "self_attention.linear_proj.bias": (hidden,),
        "mlp.linear_fc1.weight": (ffn, hidden), "mlp.linear_fc1.bias": (ffn,),
        "mlp.linear_fc2.weight": (hidden, ffn), "mlp.linear_fc2.bias": (hidden,),
    }
    for i in range(model.num_layers):
        shapes.update({f"decoder.layers.{i}.{k}": v for k, v in per_layer.items()})
    keys = project_keys(model)
    return {k: torch.Size(v) for k, v in shapes.items() if k in keys}


# --- the VAE ----------------------------------------------------------------------------------------------
# Project VAE parameter names are diffusers' `AutoencoderKLCogVideoX` names (cogvx_mega.vae.model mirrors
# them), so diffusers <-> project is a strict identity with a shape check; SAT names map by template.

VAE_FORMAT = "cogvx-mega/vae-single-v1"


def vae_expected_shapes(config) -> dict[str, torch.Size]:
    """Shape of every VAE tensor for `config`, from the model built on the meta device (no memory)."""
    from cogvx_mega.vae import CogVideoXVAE

    with torch.device("meta"):
        model = CogVideoXVAE(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def check_vae_state(state: dict[str, Tensor], config) -> None:
    """Strict: the same keys as the model, every shape equal (weights of another size fail here)."""
    expected = vae_expected_shapes(config)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"VAE weights do not match the VAE config: missing {missing[:3]} ({len(missing)}), "
                              f"unexpected {unexpected[:3]} ({len(unexpected)})")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise ConversionError(f"{key}: weight shape {tuple(state[key].shape)} != VAE shape {tuple(shape)}; the "
                                  f"weights are from another VAE configuration")


def vae_project_key_to_sat(key: str, config) -> str:
    """SAT's name of a project (= diffusers) VAE parameter. SAT numbers decoder up blocks from the lowest
    resolution up, i.e. in reverse; its resnets are `block.j` / `mid.block_{j+1}`, shortcuts `nin_shortcut`."""
    blocks = len(config.block_out_channels)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                 lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{blocks - 1 - int(m.group(1))}.", key)
    key = re.sub(r"\.(down|up)\.(\d+)\.resnets\.", r".\1.\2.block.", key)
    key = key.replace(".downsamplers.0.", ".downsample.").replace(".upsamplers.0.", ".upsample.")
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


_SAT_VAE_IGNORED = re.compile(r"^(loss\.|regularization\.)")


def sat_vae_to_project(state: dict[str, Tensor], config) -> dict[str, Tensor]:
    """A SAT VAE state dict (a bare VAE checkpoint or a whole SAT model's `first_stage_model.*`)."""
    if any(k.startswith("first_stage_model.") for k in state):
        state = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    state = {k: v for k, v in state.items() if not _SAT_VAE_IGNORED.match(k)}
    expected = vae_expected_shapes(config)
    names = {vae_project_key_to_sat(key, config): key for key in expected}
    missing = sorted(sat for sat in names if sat not in state)
    unexpected = sorted(k for k in state if k not in names)
    if missing or unexpected:
        raise ConversionError(f"SAT VAE checkpoint does not match the VAE config: missing {missing[:3]} "
                              f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")
    ours = {names[sat]: tensor for sat, tensor in state.items()}
    check_vae_state(ours, config)
    return ours


def read_diffusers_vae_folder(path: str):
    """(VAEConfig, state) from a diffusers `AutoencoderKLCogVideoX` folder or a pipeline folder with vae/."""
    from cogvx_mega.vae import vae_config_from_diffusers

    folder = Path(path)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path}: no config.json; pass a diffusers AutoencoderKLCogVideoX folder")
    raw = json.loads(config_file.read_text())
    if raw.get("_class_name", "AutoencoderKLCogVideoX") != "AutoencoderKLCogVideoX":
        raise ConversionError(f"{path}: config is a {raw['_class_name']}, not an AutoencoderKLCogVideoX")
    config = vae_config_from_diffusers(raw)
    state = read_diffusers_weights(folder)
    check_vae_state(state, config)
    return config, state


def write_diffusers_vae_folder(state: dict[str, Tensor], config, path: str) -> Path:
    from safetensors.torch import save_file

    from cogvx_mega.training.checkpoint import atomic_directory
    from cogvx_mega.vae import vae_config_to_diffusers

    check_vae_state(state, config)
    with atomic_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(vae_config_to_diffusers(config), indent=2))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "diffusion_pytorch_model.safetensors"))
    return Path(path)


def save_vae_checkpoint(path: str, state: dict[str, Tensor], config, extra: Optional[dict] = None) -> Path:
    """A project VAE checkpoint: model.safetensors + cogvx_checkpoint.json (format vae-single-v1), atomic."""
    import dataclasses

    from cogvx_mega.training.checkpoint import write_single_file_checkpoint

    check_vae_state(state, config)
    return write_single_file_checkpoint(path, state, {"format": VAE_FORMAT, "vae": dataclasses.asdict(config),
                                                      **(extra or {})})


def read_vae_checkpoint(path: str):
    from safetensors.torch import load_file

    from cogvx_mega.training.checkpoint import MODEL_FILE, read_checkpoint_meta
    from cogvx_mega.vae.config import vae_config_from_dict

    meta = read_checkpoint_meta(path)
    if meta.get("format") != VAE_FORMAT:
        raise ConversionError(f"{path}: a {meta.get('format')} checkpoint, not a VAE ({VAE_FORMAT})")
    config = vae_config_from_dict(meta["vae"])
    state = load_file(str(Path(path) / MODEL_FILE))
    check_vae_state(state, config)
    return config, state
