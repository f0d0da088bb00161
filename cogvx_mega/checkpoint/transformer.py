"""The transformer's formats: diffusers config <-> ModelConfig, the diffusers <-> project and SAT -> project
key maps, strict checks, and diffusers transformer folders.

Each direction is an exact, templated key map plus three special cases (REFERENCE §4):
- QKV: diffusers keeps to_q / to_k / to_v; megatron's fused `linear_qkv` interleaves them per head
  ([q_h; k_h; v_h] for each head h). SAT fuses them as [Q; K; V] blocks.
- the two 6-way modulations of a diffusers block (norm1.linear, norm2.linear) are one 12-way
  `adaln_modulation.linear` here; SAT stores one 12-way matrix in another chunk order.
- learned positions exist only for the rope+learned family.
`DiffusersAsProject` applies the map lazily over any `TensorSource`, so a tensor-parallel rank reads only
the rows of to_q / to_k / to_v that make its own shard of `linear_qkv`.

SAT files (the "SAT files" section) are pickles from the internet: they are read with torch's weights-only
unpickler and an allow-list of what SAT saves, never with plain unpickling unless the user passes --trust-pickle.
"""
from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from cogvx_mega.config.model import ModelConfig
from cogvx_mega.checkpoint.atomic import atomic_directory
from cogvx_mega.checkpoint.meta import ConversionError
from cogvx_mega.checkpoint.weights import DictTensors, TensorSource, open_diffusers_weights

logger = logging.getLogger(__name__)

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
    if model.final_norm_eps != model.norm_eps:
        logger.warning("diffusers has one norm_eps for every LayerNorm: the export writes norm_eps=%g, and its final "
                       "LayerNorm will use that, not this model's model.output_norm_eps=%g (outputs move by about "
                       "5e-6)", model.norm_eps, model.final_norm_eps)
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
# The linears of a layer (what LoRA can adapt): project module -> its diffusers module(s), the fused QKV as q, k, v.
LAYER_LINEARS = {
    "self_attention.linear_qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "self_attention.linear_proj": ("attn1.to_out.0",),
    "mlp.linear_fc1": ("ff.net.0.proj",),
    "mlp.linear_fc2": ("ff.net.2",),
}
_DIRECT_LAYER = {
    "input_layernorm.{p}": "norm1.norm.{p}",
    "pre_mlp_layernorm.{p}": "norm2.norm.{p}",
    "self_attention.q_layernorm.{p}": "attn1.norm_q.{p}",
    "self_attention.k_layernorm.{p}": "attn1.norm_k.{p}",
    **{f"{ours}.{{p}}": f"{theirs[0]}.{{p}}" for ours, theirs in LAYER_LINEARS.items() if len(theirs) == 1},
}
PROJECT_LAYER = "decoder.layers.{i}."
DIFFUSERS_LAYER = "transformer_blocks.{i}."


def project_keys(model: ModelConfig) -> set[str]:
    """Exactly the tensors a project state dict of this config holds."""
    keys = {k for k in _DIRECT_TOP if _top_key_applies(k, model)}
    for i in range(model.num_layers):
        prefix = PROJECT_LAYER.format(i=i)
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


def _diffusers_sources(model: ModelConfig) -> dict[str, tuple[str, tuple[str, ...]]]:
    """project key -> (how, diffusers keys): 'direct' (one key), 'qkv' (to_q, to_k, to_v) or 'concat'
    (norm1.linear, norm2.linear)."""
    plan = {ours: ("direct", (theirs,)) for ours, theirs in _DIRECT_TOP.items() if _top_key_applies(ours, model)}
    for i in range(model.num_layers):
        ours, theirs = PROJECT_LAYER.format(i=i), DIFFUSERS_LAYER.format(i=i)
        for p in ("weight", "bias"):
            for our_t, their_t in _DIRECT_LAYER.items():
                plan[ours + our_t.format(p=p)] = ("direct", (theirs + their_t.format(p=p),))
            plan[f"{ours}self_attention.linear_qkv.{p}"] = (
                "qkv", tuple(f"{theirs}{name}.{p}" for name in LAYER_LINEARS["self_attention.linear_qkv"]))
            plan[f"{ours}adaln_modulation.linear.{p}"] = ("concat", (f"{theirs}norm1.linear.{p}",
                                                                     f"{theirs}norm2.linear.{p}"))
    return plan


class DiffusersAsProject(TensorSource):
    """Project-named tensors over a diffusers source, computed on read. A slice of `linear_qkv` rows that
    covers whole heads (every tensor-parallel shard does) reads only those heads' rows of q, k and v."""

    def __init__(self, source: TensorSource, model: ModelConfig):
        self.source, self.model = source, model
        self.plan = _diffusers_sources(model)
        available = source.keys()
        for how, names in self.plan.values():
            for name in names:
                if name not in available:
                    raise ConversionError(f"diffusers checkpoint is missing {name!r}: it does not match this model "
                                          f"family ({model.num_layers} layers, positions={model.positional_embedding})")

    def unused_source_keys(self) -> list[str]:
        used = {name for _, names in self.plan.values() for name in names}
        return sorted(self.source.keys() - used)

    def check_nothing_unused(self) -> None:
        """A clear error when the source holds tensors this model family has no place for."""
        unused = self.unused_source_keys()
        if unused:
            raise ConversionError(f"diffusers checkpoint has {len(unused)} tensors this model family does not use, "
                                  f"e.g. {unused[:3]}: check the config (layers, positions, ofs)")

    def keys(self) -> set[str]:
        return set(self.plan)

    def shape(self, key: str) -> tuple[int, ...]:
        how, names = self.plan[key]
        first = self.source.shape(names[0])
        if how == "direct":
            return first
        rows = sum(self.source.shape(name)[0] for name in names)
        return (rows, *first[1:])

    def read(self, key, dim=None, start=0, stop=None):
        how, names = self.plan[key]
        if how == "direct":
            return self.source.read(names[0], dim, start, stop)
        if how == "qkv":
            heads = self.model.num_attention_heads
            head_dim = self.source.shape(names[0])[0] // heads
            rows_per_head = 3 * head_dim
            stop = self.shape(key)[0] if dim == 0 and stop is None else stop
            if dim == 0 and start % rows_per_head == 0 and stop % rows_per_head == 0:
                first, last = start // rows_per_head, stop // rows_per_head  # whole heads [first, last)
                q, k, v = (self.source.read(name, 0, first * head_dim, last * head_dim) for name in names)
                return fuse_qkv_per_head(q, k, v, last - first)
            full = fuse_qkv_per_head(*(self.source.read(name) for name in names), heads)
        else:
            full = torch.cat([self.source.read(name) for name in names], dim=0)
        return full if dim is None else full.narrow(dim, start, (full.shape[dim] if stop is None else stop) - start)


def diffusers_to_project(state: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    view = DiffusersAsProject(DictTensors(state), model)
    view.check_nothing_unused()
    return view.read_all()


def project_to_diffusers(state: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    check_project_state(state, model)
    out: dict[str, Tensor] = {}
    hidden, heads = model.hidden_size, model.num_attention_heads
    for ours, (how, names) in _diffusers_sources(model).items():
        tensor = state[ours]
        if how == "direct":
            out[names[0]] = tensor.clone()
        elif how == "qkv":
            for name, part in zip(names, split_qkv_per_head(tensor, heads)):
                out[name] = part
        else:
            out[names[0]], out[names[1]] = tensor[: 6 * hidden].clone(), tensor[6 * hidden:].clone()
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


@torch.no_grad()
def load_project_state(model: torch.nn.Module, state: dict[str, Tensor], model_config: ModelConfig) -> None:
    """Strict copy of a whole-model project state dict into a single-process model (clear error on missing,
    unexpected or mis-shaped tensors)."""
    reference = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    check_project_state(state, model_config, reference=reference)
    for key, value in state.items():
        if not key.endswith("_extra_state"):
            reference[key].copy_(value)


# --- SAT files: where the weights are, and reading a pickle from outside -----------------------------------
#
# SAT (SwissArmyTransformer, the CogVideoX authors' training code) saves through DeepSpeed: a checkpoint
# folder holds `latest` (a text file naming the iteration tag, e.g. `1000`) and
# `<tag>/mp_rank_00_model_states.pt`, a torch.save'd dict whose `module` entry is the state dict, beside
# DeepSpeed's and SAT's bookkeeping (`buffer_names`, `param_shapes`, `ds_config`, `ds_version`, `iteration`,
# `client_lr_scheduler`, the RNG states ...). The released SAT downloads keep that layout:
# `<name>-sat/transformer/{latest, 1000/...}` and `<name>-sat/vae/3d-vae.pt`, the VAE as
# `{"state_dict": ...}` (SAT reads it with `torch.load(path)["state_dict"]`).

SAT_MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
SAT_LATEST_FILE = "latest"
# Where a torch.save'd dict keeps its state dict: `module` (DeepSpeed, SAT), `state_dict` (Lightning, SAT's
# VAE file), `model` (plain saves); diffusers' CogVideoX converter unwraps the same three.
SAT_STATE_WRAPPERS = ("module", "state_dict", "model")
TRUST_PICKLE_FLAG = "--trust-pickle"


def sat_pickle_allowed_globals() -> list:
    """What a SAT checkpoint holds besides tensors, containers and plain values (which torch's weights-only
    unpickler accepts by itself), for `torch.serialization.safe_globals`:

    - numpy's RNG state (`np_rng_state`, saved by SAT unless `--no-save-rng`): a uint32 array, i.e. numpy's
      `_reconstruct` (named `numpy.core.multiarray` by numpy 1, `numpy._core.multiarray` by numpy 2),
      `ndarray`, `dtype` and the `UInt32DType` it builds;
    - `argparse.Namespace`, the `args` of trainers built on Megatron-DeepSpeed (a plain attribute bag; what
      it holds is unpickled under the same rules).

    Python's `random` state is a tuple of ints and torch's RNG states are tensors; DeepSpeed's entries are
    dicts, lists, sets, `OrderedDict`s and `torch.Size`s, all accepted by default."""
    import argparse

    import numpy

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    allowed = [argparse.Namespace, numpy.ndarray, numpy.dtype, _reconstruct]
    if hasattr(numpy, "dtypes"):  # numpy >= 1.25 builds a dtype as an instance of its own class
        allowed.append(numpy.dtypes.UInt32DType)
    if _torch_accepts_global_aliases():
        own = f"{_reconstruct.__module__}.{_reconstruct.__name__}"
        allowed += [(_reconstruct, name) for name in ("numpy.core.multiarray._reconstruct",
                                                      "numpy._core.multiarray._reconstruct") if name != own]
    return allowed


def _allowing(allowed: list):
    """torch's `safe_globals` context (torch >= 2.5); torch 2.4 has only the process-wide `add_safe_globals`."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(allowed)
    torch.serialization.add_safe_globals(allowed)
    return contextlib.nullcontext()


def _torch_accepts_global_aliases() -> bool:
    """torch >= 2.6 takes (object, "its.pickled.name") pairs in `safe_globals`."""
    from packaging.version import Version

    return Version(torch.__version__.split("+")[0]) >= Version("2.6")


def _refused_pickle_names(file: Path, error: Exception) -> list[str]:
    """What torch's weights-only unpickler refused in `file`: every global the file names that is not allowed
    (zip files, where torch can list them) or else the one the error names, and any type it refused to build."""
    message = str(error)
    names = re.findall(r"but got <class '([^']+)'>", message)
    listed = None
    reader = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if reader is not None and zipfile.is_zipfile(file):
        allowed = set()
        for entry in sat_pickle_allowed_globals():
            obj, name = entry if isinstance(entry, tuple) else (entry, None)
            allowed.add(name or f"{obj.__module__}.{obj.__qualname__}")
        try:
            listed = [name for name in reader(str(file)) if name not in allowed]
        except Exception:  # noqa: BLE001 - the error message still names one
            listed = None
    names += listed if listed else re.findall(r"GLOBAL ([\w.]+) was not an allowed global", message)
    return sorted(set(names))


def load_sat_pickle(file: str | Path, trust_pickle: bool = False):
    """The object torch.save'd in a SAT file, read with torch's weights-only unpickler: tensors, containers,
    plain values and `sat_pickle_allowed_globals()` only, so a downloaded file cannot run code. Anything else
    is one ConversionError naming what was refused; `trust_pickle` (the CLI's --trust-pickle) unpickles
    everything, for files from a source the user trusts."""
    file = Path(file)
    mmap = zipfile.is_zipfile(file)  # mmap needs torch's zip format (torch >= 1.6); the 10 GB 5B files stay on disk
    if not mmap:  # torch's older format is a pickle stream, which torch.save begins with the PROTO opcode
        with open(file, "rb") as handle:
            head = handle.read(8)
        if head.startswith(b"version "):
            raise ConversionError(f"{file}: a Git LFS pointer, not the file itself; fetch it (git lfs pull)")
        if head[:1] != b"\x80":
            shown = f"begins with {head!r}" if head else "is empty"
            raise ConversionError(f"{file}: not a torch checkpoint (it {shown}; a failed download leaves an HTML "
                                  f"page or an error message)")
    try:
        if trust_pickle:
            return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
        with _allowing(sat_pickle_allowed_globals()):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError:
        raise  # the machine's fault (permissions, I/O), reported as such
    except pickle.UnpicklingError as error:
        message = str(error)
        if trust_pickle or "WeightsUnpickler error:" not in message:
            raise ConversionError(f"{file}: could not be read as a torch checkpoint "
                                  f"({_first_line(message)})") from None
        refused = _refused_pickle_names(file, error)
        if refused:
            raise ConversionError(
                f"{file}: refused to unpickle {', '.join(refused)}: a SAT checkpoint needs only tensors, plain "
                f"values, argparse.Namespace and numpy's RNG state, and unpickling other objects can run code from "
                f"the file; if you trust its source, pass {TRUST_PICKLE_FLAG}") from None
        detail = _first_line(message.split("WeightsUnpickler error:")[-1])
        raise ConversionError(f"{file}: not a torch checkpoint that torch's weights-only unpickler reads ({detail}); "
                              f"if it is one from a source you trust, pass {TRUST_PICKLE_FLAG}") from None
    except Exception as error:  # noqa: BLE001 - torch reports a damaged or foreign file in many types
        raise ConversionError(f"{file}: could not be read as a torch checkpoint ({type(error).__name__}: "
                              f"{_first_line(str(error))})") from None


def _first_line(message: str) -> str:
    lines = message.strip().splitlines()
    return lines[0].strip() if lines else "no details"


def _is_state_dict(blob) -> bool:
    return (isinstance(blob, dict) and bool(blob) and all(isinstance(k, str) for k in blob)
            and all(isinstance(v, Tensor) for v in blob.values()))


def unwrap_state_dict(blob, file: str | Path) -> dict[str, Tensor]:
    """The state dict inside a loaded SAT file: the dict itself, or the one under its `module`, `state_dict`
    or `model` entry (nested wrappers too). One clear error when there is none, or more than one."""
    for _ in range(len(SAT_STATE_WRAPPERS) + 1):
        if _is_state_dict(blob):
            return blob
        if not isinstance(blob, dict):
            break
        wrappers = [key for key in SAT_STATE_WRAPPERS if isinstance(blob.get(key), dict)]
        if len(wrappers) != 1:
            tensors = [k for k, v in blob.items() if isinstance(v, Tensor)]
            if tensors and not wrappers:
                others = sorted(str(k) for k, v in blob.items() if not isinstance(v, Tensor))
                raise ConversionError(f"{file}: a state dict with {len(others)} entries that are not tensors, "
                                      f"e.g. {others[:3]}; not a SAT checkpoint")
            found = f"both {wrappers}" if wrappers else f"none of {list(SAT_STATE_WRAPPERS)}"
            raise ConversionError(f"{file}: no single state dict in it ({found}; top-level entries "
                                  f"{sorted(map(str, blob))[:8]}); not a SAT checkpoint")
        blob = blob[wrappers[0]]
    raise ConversionError(f"{file}: holds a {type(blob).__name__}, not a state dict; not a SAT checkpoint")


def read_sat_file(file: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The state dict of one SAT `.pt` file (transformer or VAE), read safely (`load_sat_pickle`)."""
    return unwrap_state_dict(load_sat_pickle(file, trust_pickle), file)


def find_sat_transformer_file(path: str | Path) -> Path:
    """The `mp_rank_00_model_states.pt` a user means by `path`: that file itself; an iteration folder holding
    it; a SAT checkpoint folder, through its `latest` file (as SAT resumes); or a released `<name>-sat` folder
    (its `transformer/` is such a checkpoint folder). Model-parallel checkpoints (more than one mp_rank file)
    and ZeRO-3 partitions are refused: their tensors are split across files."""
    location = Path(path)
    if location.is_file():
        folder, file = location.parent, location
    elif location.is_dir():
        if not (location / SAT_LATEST_FILE).is_file() and (location / "transformer" / SAT_LATEST_FILE).is_file():
            location = location / "transformer"  # a released <name>-sat folder: transformer/ and vae/
        if (location / SAT_MODEL_STATES_FILE).is_file():
            folder = location
        elif (location / SAT_LATEST_FILE).is_file():
            tag = (location / SAT_LATEST_FILE).read_text().strip()
            if not tag or tag in (".", "..") or "/" in tag or "\\" in tag:
                raise ConversionError(f"{location / SAT_LATEST_FILE}: names {tag!r}, not an iteration folder; "
                                      f"pass the iteration folder itself")
            folder = location / tag
            if not (folder / SAT_MODEL_STATES_FILE).is_file():
                raise ConversionError(f"{location / SAT_LATEST_FILE} names iteration {tag!r}, but there is no "
                                      f"{folder / SAT_MODEL_STATES_FILE}; pass the iteration folder or the file")
        else:
            partitions = sorted(p.name for p in location.glob("z3_rank_*_model_states.pt"))
            if partitions:
                raise ConversionError(f"{path}: a ZeRO-3 partitioned SAT checkpoint ({len(partitions)} files); "
                                      f"consolidate it into one {SAT_MODEL_STATES_FILE} first")
            raise ConversionError(f"{path}: no {SAT_MODEL_STATES_FILE} and no '{SAT_LATEST_FILE}' file; pass a "
                                  f"SAT checkpoint folder, its iteration folder or the .pt file")
        file = folder / SAT_MODEL_STATES_FILE
    else:
        raise ConversionError(f"{path}: no such SAT checkpoint file or folder")
    if re.fullmatch(r"mp_rank_\d+_model_states\.pt", file.name):
        ranks = sorted(p.name for p in folder.glob("mp_rank_*_model_states.pt"))
        if len(ranks) > 1:
            raise ConversionError(f"{folder}: a model-parallel SAT checkpoint ({len(ranks)} mp_rank files); only "
                                  f"model_parallel_size 1 is supported: merge the ranks into one file first")
    return file


def read_sat_transformer(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The state dict of a SAT transformer checkpoint (`find_sat_transformer_file` says which paths work)."""
    return read_sat_file(find_sat_transformer_file(path), trust_pickle)


# --- SAT -> project --------------------------------------------------------------------------------------
#
# Numbers: the converted model computes what diffusers' CogVideoXTransformer3DModel computes on the same weights.
# SAT differs in one constant: its final adaLN LayerNorm (`mixins.final_layer.norm_final`, our `output_norm`)
# has eps 1e-6, where diffusers' `norm_out.norm` uses its one `norm_eps` (1e-5); SAT's block LayerNorms and
# `transformer.final_layernorm` use its `layernorm_epsilon`, 1e-5 as here. Outputs therefore agree with SAT to
# ~5e-6; `model.output_norm_eps=1e-6` gives SAT's own numbers (tests/unit/test_parity_diffusers.py).

SAT_PREFIX = "model.diffusion_model."
# Whole other models in a whole-engine SAT file (a full fine-tune saves them all): the VAE (read by
# `vae-sat-to-project`) and the T5 text encoder. Dropped by prefix.
_SAT_OTHER_MODELS = ("first_stage_model.", "conditioner.")
# Tensors SAT's CogVideoX transformer stores and this project does not load, by positional family, each by
# name (under SAT_PREFIX) with the reason. Everything else in the file must map to a project tensor.
_SAT_NOT_LOADED = {
    "sincos": {
        # Basic3DPositionEmbeddingMixin's table, a frozen Parameter (requires_grad=False): zeros for the text,
        # the 3D sin-cos embedding for the video; recomputed here from the config.
        "mixins.pos_embed.pos_embedding": "the fixed 3D sin-cos position table",
    },
    "rope": {
        # SAT's BaseTransformer always creates an nn.Embedding(max_sequence_length, hidden) (64 x hidden in
        # CogVideoX's configs); only the sin-cos mixins delete it, Rotary3DPositionEmbeddingMixin replaces its
        # use, so every RoPE checkpoint carries it untrained. diffusers' converter drops it as well.
        "transformer.position_embeddings.weight": "BaseTransformer's unused position embedding",
        # the RoPE cos/sin tables, registered buffers in the CogVideoX 1.0 SAT code; recomputed here.
        "mixins.pos_embed.freqs_sin": "the RoPE sin table",
        "mixins.pos_embed.freqs_cos": "the RoPE cos table",
    },
}
_SAT_NOT_LOADED["rope+learned"] = _SAT_NOT_LOADED["rope"]
# SAT's 12 modulation chunks in diffusers' order (norm1 ‖ norm2), REFERENCE §4.
_SAT_MODULATION_ORDER = (0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11)
_SAT_TOP = {
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
_SAT_LAYER = {
    "input_layernorm.{p}": "transformer.layers.{i}.input_layernorm.{p}",
    "pre_mlp_layernorm.{p}": "transformer.layers.{i}.post_attention_layernorm.{p}",
    "self_attention.q_layernorm.{p}": "mixins.adaln_layer.query_layernorm_list.{i}.{p}",
    "self_attention.k_layernorm.{p}": "mixins.adaln_layer.key_layernorm_list.{i}.{p}",
    "self_attention.linear_proj.{p}": "transformer.layers.{i}.attention.dense.{p}",
    "mlp.linear_fc1.{p}": "transformer.layers.{i}.mlp.dense_h_to_4h.{p}",
    "mlp.linear_fc2.{p}": "transformer.layers.{i}.mlp.dense_4h_to_h.{p}",
}


def sat_to_project(state: dict[str, Tensor], model: ModelConfig) -> dict[str, Tensor]:
    """Project-named tensors of a SAT CogVideoX state dict (`model.diffusion_model.*` names) for `model`.
    Strict: the other models of a whole-engine file and the family's `_SAT_NOT_LOADED` tensors are dropped
    by name; a missing tensor, or any other one left over, is one ConversionError naming it."""
    source = {k: v for k, v in state.items() if not k.startswith(_SAT_OTHER_MODELS)}
    if not any(k.startswith(SAT_PREFIX) for k in source):
        raise ConversionError(f"no '{SAT_PREFIX}*' tensors: this is not a SAT CogVideoX transformer checkpoint")
    for name, what in _SAT_NOT_LOADED[model.positional_embedding].items():
        if source.pop(SAT_PREFIX + name, None) is not None:
            logger.debug("SAT checkpoint: not loading %s%s (%s)", SAT_PREFIX, name, what)

    def take(key: str) -> Tensor:
        try:
            return source.pop(SAT_PREFIX + key)
        except KeyError:
            raise ConversionError(f"SAT checkpoint is missing {SAT_PREFIX + key!r}: it does not match this model "
                                  f"family ({model.num_layers} layers, positions={model.positional_embedding})") from None

    out: dict[str, Tensor] = {}
    for ours, theirs in _SAT_TOP.items():
        if _top_key_applies(ours, model):
            out[ours] = take(theirs)
    heads = model.num_attention_heads
    for i in range(model.num_layers):
        prefix = PROJECT_LAYER.format(i=i)
        for our_t, their_t in _SAT_LAYER.items():
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
        unused = sorted(source)
        raise ConversionError(f"SAT checkpoint has {len(unused)} tensor{'s' if len(unused) > 1 else ''} this "
                              f"model family (positions={model.positional_embedding}) does not use: "
                              f"{', '.join(unused[:3])}{' ...' if len(unused) > 3 else ''}; check --preset")
    return out


# --- diffusers transformer folders ------------------------------------------------------------------------

def diffusers_transformer_folder(path: str | Path) -> Path:
    """The transformer folder of a diffusers transformer or pipeline folder (clear error otherwise)."""
    folder = Path(path)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"  # a whole pipeline folder
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{path}: no config.json; pass a diffusers transformer folder")
    return folder


def open_diffusers_transformer(path: str | Path) -> tuple[ModelConfig, DiffusersAsProject]:
    """(model config, project-named lazy view of its weights) of a diffusers transformer or pipeline folder."""
    folder = diffusers_transformer_folder(path)
    model = model_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    return model, DiffusersAsProject(open_diffusers_weights(folder), model)


def read_diffusers_folder(path: str) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(model config, diffusers-named state) of a diffusers transformer or pipeline folder."""
    folder = diffusers_transformer_folder(path)
    model = model_config_from_diffusers(json.loads((folder / "config.json").read_text()))
    return model, open_diffusers_weights(folder).read_all()


def write_diffusers_folder(state: dict[str, Tensor], model: ModelConfig, path: str) -> Path:
    """Write a diffusers transformer folder atomically (a temporary sibling, then rename)."""
    from safetensors.torch import save_file

    with atomic_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(diffusers_config_from_model(model), indent=2))
        save_file({k: v.contiguous() for k, v in project_to_diffusers(state, model).items()},
                  str(tmp / "diffusion_pytorch_model.safetensors"))
    return Path(path)
