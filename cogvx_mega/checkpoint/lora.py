"""LoRA checkpoints and LoRA files, as tensors (no model is built here): a leaf that reads adapters and merges
deltas into weights it is given. Following a LoRA checkpoint to its base (and that base to its own base) is the
reader's job (`checkpoint.reader.resolve_lora_chain`).

A LoRA training checkpoint is a torch-dist-v1 checkpoint whose model part holds only the adapters
(`decoder.layers.{i}.<path>.lora_A|B`, stacked over layers by megatron like every layer tensor) and whose
metadata names the base weights (`meta["lora"]`: rank, alpha, targets, dropout, base path, base
fingerprint). Readers rebuild the fine-tuned model as base + alpha/rank * B A per adapted linear.

diffusers / PEFT LoRA files (`pytorch_lora_weights.safetensors`, what `CogVideoXPipeline.load_lora_weights`
reads) name the adapters of diffusers' modules: `transformer.transformer_blocks.{i}.attn1.to_q.lora_A.weight`
and `...lora_B.weight`. Our fused QKV adapter (A shared by q, k and v; B rows in megatron's per-head order) is
written as three adapters with the same A; the scale is folded into B, so the file needs no alpha (PEFT's
default alpha = rank gives scale 1).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.model import ModelConfig
from cogvx_mega.checkpoint.meta import ConversionError
from cogvx_mega.checkpoint.transformer import (DIFFUSERS_LAYER, LAYER_LINEARS, PROJECT_LAYER, fuse_qkv_per_head,
                                               split_qkv_per_head)

LORA_FILE = "pytorch_lora_weights.safetensors"
# target (finetune.lora_targets) -> (path in a layer, diffusers module(s) in a block): the converter's key map
_DIFFUSERS_MODULES = {path.rpartition(".")[2]: (path, modules) for path, modules in LAYER_LINEARS.items()}
_DIFFUSERS_BLOCK = "transformer." + DIFFUSERS_LAYER


def lora_weight_key(layer: int, target: str) -> str:
    """The project key of the base weight a target adapts in layer `layer`."""
    return PROJECT_LAYER.format(i=layer) + _DIFFUSERS_MODULES[target][0] + ".weight"


# --- adapters of a LoRA training checkpoint -------------------------------------------------------------------

def read_lora_adapters(path: str | os.PathLike, meta: dict,
                       ema: bool = False) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
    """{(layer, target): (A [r, in], B [out, r])} of a LoRA training checkpoint, read in this process (`ema`: the
    adapters' weight average)."""
    from cogvx_mega.checkpoint.sharded import EMA_PREFIX, read_stored_tensors

    lora, layers = meta["lora"], int(meta["model"]["num_layers"])
    prefix = EMA_PREFIX if ema else ""
    keys = [f"decoder.layers.{_DIFFUSERS_MODULES[target][0]}.{factor}" for target in lora["targets"]
            for factor in ("lora_A", "lora_B")]
    buffers = {key[len(prefix):]: value for key, value in
               read_stored_tensors(path, [prefix + k for k in keys], "the LoRA checkpoint is damaged").items()}
    out = {}
    for target in lora["targets"]:
        a, b = (buffers[f"decoder.layers.{_DIFFUSERS_MODULES[target][0]}.{f}"] for f in ("lora_A", "lora_B"))
        for layer in range(layers):
            out[(layer, target)] = (a[layer].float().clone(), b[layer].float().clone())
    return out


def lora_scale(lora_meta: dict) -> float:
    return float(lora_meta["alpha"]) / float(lora_meta["rank"])


def adapter_deltas(adapters: dict, scale: float) -> dict[str, Tensor]:
    """{project weight key: scale * B A} of every adapted linear."""
    return {lora_weight_key(layer, target): scale * b @ a for (layer, target), (a, b) in adapters.items()}


def accumulate_deltas(total: dict[str, Tensor], more: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add `more` into `total` key by key (both {project weight key: delta}); returns `total`."""
    for key, delta in more.items():
        total[key] = total[key] + delta if key in total else delta
    return total


def merge_deltas(state: dict[str, Tensor], deltas: dict[str, Tensor]) -> dict[str, Tensor]:
    """A copy of a project state with the deltas added (in the weights' dtype, computed in fp32)."""
    merged = dict(state)
    for key, delta in deltas.items():
        if key not in merged or tuple(merged[key].shape) != tuple(delta.shape):
            raise ConversionError(f"the LoRA adapter of {key} does not fit the base weights "
                                  f"({tuple(delta.shape)} vs {tuple(merged[key].shape) if key in merged else 'none'})")
        merged[key] = (merged[key].float() + delta).to(merged[key].dtype)
    return merged


# --- diffusers / PEFT LoRA files ------------------------------------------------------------------------------

def diffusers_lora_state(adapters: dict, scale: float, model: ModelConfig) -> dict[str, Tensor]:
    """The PEFT/diffusers tensors of our adapters (scale folded into B)."""
    out = {}
    for (layer, target), (a, b) in sorted(adapters.items()):
        prefix = _DIFFUSERS_BLOCK.format(i=layer)
        names = _DIFFUSERS_MODULES[target][1]
        parts = split_qkv_per_head(b, model.num_attention_heads) if target == "linear_qkv" else (b,)
        for name, part in zip(names, parts):
            out[f"{prefix}{name}.lora_A.weight"] = a.contiguous().clone()
            out[f"{prefix}{name}.lora_B.weight"] = (scale * part).contiguous()
    return out


def write_lora_folder(state: dict[str, Tensor], folder: str | os.PathLike, metadata: dict,
                      also: Optional[Callable[[Path], None]] = None) -> Path:
    """A diffusers LoRA folder (`LORA_FILE`, our metadata in its header), written atomically; `also(tmp)` adds
    more files to it before it is put in place (an export's marker)."""
    from safetensors.torch import save_file

    from cogvx_mega.checkpoint.atomic import atomic_directory

    with atomic_directory(folder) as tmp:
        save_file(state, str(tmp / LORA_FILE), metadata={"format": "pt", "cogvx_mega": json.dumps(metadata)})
        if also is not None:
            also(tmp)
    return Path(folder)


def deltas_from_diffusers_lora(path: str | os.PathLike, model: ModelConfig) -> dict[str, Tensor]:
    """{project weight key: delta W} of a diffusers/PEFT LoRA file (or a folder holding one) for this model.
    The scale is alpha / rank from the file's adapter metadata where it has some, else 1 (PEFT's default)."""
    from safetensors import safe_open

    file = Path(path)
    if file.is_dir():
        file = file / LORA_FILE
    if not file.is_file():
        raise ConfigError("--init-lora", str(path), f"no {LORA_FILE} there; pass a diffusers LoRA folder or file")
    with safe_open(str(file), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        header = handle.metadata() or {}
    alpha = None
    if "lora_adapter_metadata" in header:  # diffusers' save_lora_weights(..., transformer_lora_adapter_metadata)
        config = json.loads(header["lora_adapter_metadata"])
        config = config.get("transformer", config) if isinstance(config, dict) else {}
        alpha = config.get("lora_alpha")
    modules: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        for factor in ("lora_A", "lora_B"):
            marker = f".{factor}."
            if marker in name:
                modules.setdefault(name.split(marker)[0], {})[factor] = tensor.float()
                break
        else:
            raise ConfigError("--init-lora", str(path), f"holds {key!r}, which is not a PEFT LoRA tensor "
                                                        f"(lora_A / lora_B)")
    by_diffusers_name = {f"transformer_blocks.{i}.{name}": (i, target, index)
                         for i in range(model.num_layers)
                         for target, (_, names) in _DIFFUSERS_MODULES.items() for index, name in enumerate(names)}
    deltas: dict[str, list] = {}
    for module, factors in modules.items():
        if module not in by_diffusers_name or set(factors) != {"lora_A", "lora_B"}:
            raise ConfigError("--init-lora", str(path), f"adapts {module!r}, which this model has no adapter place "
                                                        f"for (or its lora_A / lora_B is missing); LoRA targets here "
                                                        f"are the attention q/k/v/out and FFN linears")
        layer, target, index = by_diffusers_name[module]
        a, b = factors["lora_A"], factors["lora_B"]
        scale = 1.0 if alpha is None else float(alpha) / a.shape[0]
        parts = deltas.setdefault(lora_weight_key(layer, target), [None] * len(_DIFFUSERS_MODULES[target][1]))
        parts[index] = scale * b @ a
    out = {}
    for key, parts in deltas.items():
        if len(parts) == 3:  # q, k, v -> megatron's fused per-head rows; a missing one adapts nothing
            reference = next(p for p in parts if p is not None)
            parts = [p if p is not None else torch.zeros_like(reference) for p in parts]
            out[key] = fuse_qkv_per_head(*parts, model.num_attention_heads)
        else:
            out[key] = parts[0]
    return out

