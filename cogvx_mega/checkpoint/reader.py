"""One entry point for transformer weights in any format we accept: a diffusers transformer folder, a
diffusers pipeline folder (its transformer/), a single-v1 or a torch-dist-v1 project checkpoint; and the one
place that follows a LoRA checkpoint to the base weights it was trained on (`resolve_lora_chain`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from torch import Tensor

from cogvx_mega.checkpoint.lora import (accumulate_deltas, adapter_deltas, deltas_from_diffusers_lora, lora_scale,
                                        merge_deltas, read_lora_adapters)
from cogvx_mega.config.errors import ConfigError
from cogvx_mega.config.model import ModelConfig, RUNTIME_MODEL_FIELDS, model_config_from_dict
from cogvx_mega.checkpoint.meta import (SHARDED_FORMAT, SINGLE_FORMAT, TRANSFORMER_FORMATS, is_project_checkpoint,
                                        read_checkpoint_meta)
from cogvx_mega.checkpoint.single_file import open_single_file_checkpoint
from cogvx_mega.checkpoint.verify import refuse_damaged
from cogvx_mega.checkpoint.transformer import open_diffusers_transformer
from cogvx_mega.checkpoint.weights import TensorSource


@dataclass
class TransformerWeights:
    """Where a checkpoint's transformer weights are and how to read them."""

    path: Path
    kind: str
    """'diffusers', 'single' or 'sharded'."""
    model: ModelConfig
    meta: dict
    source: Optional[TensorSource]
    """Project-named tensors read lazily (diffusers and single); None for sharded checkpoints, which are
    read through megatron (at a layout) or `read_sharded_model_state` (in one process)."""


def open_transformer_weights(path: str | os.PathLike) -> TransformerWeights:
    folder = Path(path)
    if not folder.exists():
        raise ConfigError("checkpoint", str(path), "no such file or folder; pass a diffusers transformer (or "
                                                   "pipeline) folder or a cogvx-mega checkpoint folder")
    if is_project_checkpoint(folder):
        meta = read_checkpoint_meta(folder)
        if meta["format"] not in TRANSFORMER_FORMATS:
            raise ConfigError("checkpoint", str(path), f"format {meta['format']!r} is not a transformer checkpoint "
                                                       f"({', '.join(TRANSFORMER_FORMATS)})")
        if meta["format"] == SHARDED_FORMAT:
            return TransformerWeights(folder, "sharded", model_config_from_dict(meta["model"]), meta, None)
        assert meta["format"] == SINGLE_FORMAT
        model, source = open_single_file_checkpoint(folder, meta)
        return TransformerWeights(folder, "single", model, meta, source)
    model, source = open_diffusers_transformer(folder)
    return TransformerWeights(folder, "diffusers", model, {"format": "diffusers", "step": 0}, source)


WEIGHT_CHOICES = ("ema", "model")


def reads_average(weights: TransformerWeights, asked: Optional[str]) -> bool:
    """Whether `--weights` (`asked`: 'ema', 'model' or None) reads the checkpoint's weight average (training.ema):
    None takes it when the checkpoint has one; 'ema' from a checkpoint without one is a ConfigError."""
    has_average = bool(weights.meta.get("ema"))
    if asked not in (None, *WEIGHT_CHOICES):
        raise ConfigError("--weights", asked, f"choose one of {', '.join(WEIGHT_CHOICES)}")
    if asked == "ema" and not has_average:
        raise ConfigError("--weights", asked, f"{weights.path} holds no weight average (trained without "
                                              f"training.ema_decay); use --weights model")
    return has_average if asked is None else asked == "ema"


Verify = Optional[Callable[[Path], None]]
"""What a reader does with each project checkpoint it opens before reading it: `checkpoint.verify.refuse_damaged`
(every size and checksum, in this process), a job's shared check, or None (--no-verify)."""


def verified(weights: TransformerWeights, verify: Verify) -> TransformerWeights:
    """`weights`, after `verify` of its folder when it is a project checkpoint (diffusers folders record no
    checksums)."""
    if verify is not None and weights.kind != "diffusers":
        verify(weights.path)
    return weights


def read_transformer_checkpoint(path: str | os.PathLike, verify: Verify = refuse_damaged,
                                weights_choice: Optional[str] = None) -> tuple[ModelConfig, dict[str, Tensor], dict]:
    """(model config, the whole project-named state, metadata) of any accepted format, in this process:
    nothing is built, no process group is touched. A LoRA checkpoint gives its base with the adapters merged.
    Every project checkpoint read (a LoRA checkpoint's bases too) is verified first (`verify`).
    `weights_choice` ('ema', 'model', None: the average when there is one, `reads_average`): the checkpoint's
    weights or their average (a LoRA checkpoint: its adapters' average, on its base's weights); the metadata
    returned says which under `weights_read`."""
    from cogvx_mega.checkpoint.sharded import read_sharded_model_state

    weights = verified(open_transformer_weights(path), verify)
    average = reads_average(weights, weights_choice)
    base, deltas = resolve_lora_chain(weights, verify, ema=average)
    if base.kind == "sharded":
        _, state = read_sharded_model_state(base.path, base.meta, ema=average and base is weights)
    else:
        if base.kind == "diffusers":
            base.source.check_nothing_unused()
        state = base.source.read_all()
    return weights.model, merge_deltas(state, deltas) if deltas else state, {
        **weights.meta, "weights_read": "ema" if average else "model"}


def read_project_checkpoint(path: str | os.PathLike,
                            verify: Verify = refuse_damaged) -> tuple[ModelConfig, dict[str, Tensor], dict]:
    """Like `read_transformer_checkpoint`, for project checkpoints only (single-v1 or torch-dist-v1)."""
    if not is_project_checkpoint(path):
        read_checkpoint_meta(path)  # raises the clear "no cogvx_checkpoint.json" error
    return read_transformer_checkpoint(path, verify)


# --- LoRA checkpoints and their bases -------------------------------------------------------------------------

def resolve_lora_chain(weights: TransformerWeights, verify: Verify = None,
                       ema: bool = False) -> tuple[TransformerWeights, dict[str, Tensor]]:
    """(the full weights under a LoRA checkpoint, {project weight key: the summed delta}) of `weights`: a LoRA
    training checkpoint holds adapters and points at its base (checked to be the weights it was trained on),
    which may itself be a LoRA checkpoint; each level adds its adapters (alpha / rank * B A) and the diffusers
    LoRA merged into its base before training (`--init-lora`), if any. Full weights give themselves and {}. Each
    base is verified (`verify`) before it is read; `weights` itself is the caller's to verify. `ema`: the first
    level's adapters are its weight average (the bases are what the run trained on: their weights)."""
    deltas: dict[str, Tensor] = {}
    while weights.kind == "sharded" and weights.meta.get("lora"):
        lora = weights.meta["lora"]
        base = check_lora_base(lora, weights.model, str(weights.path))
        accumulate_deltas(deltas, adapter_deltas(read_lora_adapters(weights.path, weights.meta, ema=ema),
                                                 lora_scale(lora)))
        ema = False
        if lora.get("base_lora"):
            accumulate_deltas(deltas, deltas_from_diffusers_lora(lora["base_lora"], weights.model))
        weights = verified(open_transformer_weights(base), verify)
    return weights, deltas


def lora_chain(path: str | os.PathLike) -> list[Path]:
    """`path` and, for a LoRA checkpoint, the bases under it (from their metadata alone, nothing read)."""
    chain = [Path(path)]
    while is_project_checkpoint(chain[-1]):
        lora = read_checkpoint_meta(chain[-1]).get("lora")
        if not lora:
            break
        chain.append(Path(lora["base"]))
    return chain


def _weights_config(model: ModelConfig) -> dict:
    """The model fields that are properties of the weights (not how the model runs, not the VAE's scale)."""
    return {k: v for k, v in dataclasses.asdict(model).items() if k not in (*RUNTIME_MODEL_FIELDS, "latent_scale")}


def base_fingerprint(path: str | os.PathLike) -> str:
    """A short digest that changes when the base weights at `path` change: the model config and two tensors
    read lazily (diffusers or single-file), or the metadata of a sharded checkpoint (a step of one run)."""
    weights = open_transformer_weights(path)
    digest = hashlib.sha256(json.dumps(_weights_config(weights.model), sort_keys=True).encode())
    if weights.source is None:
        digest.update(json.dumps(weights.meta, sort_keys=True, default=str).encode())
    else:
        for key in ("time_embedding.linear_1.weight", "patch_embed.text_proj.weight"):
            digest.update(weights.source.read(key).float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_lora_base(lora_meta: dict, model: ModelConfig, where: str) -> Path:
    """The base of a LoRA checkpoint, checked: it exists, holds this model and is the weights it was trained
    on (its fingerprint); one clear error otherwise."""
    base = Path(lora_meta["base"])
    if not base.exists():
        raise ConfigError("checkpoint", where, f"is a LoRA checkpoint of the base {base}, which does not exist any "
                                               f"more; put the base weights back at that path")
    if _weights_config(open_transformer_weights(base).model) != _weights_config(model):
        raise ConfigError("checkpoint", where, f"is a LoRA checkpoint whose base {base} holds another model; it "
                                               f"does not match the adapters")
    found = base_fingerprint(base)
    if found != lora_meta.get("base_fingerprint"):
        raise ConfigError("checkpoint", where, f"is a LoRA checkpoint whose base {base} has changed since training "
                                               f"(fingerprint {found}, trained on {lora_meta.get('base_fingerprint')}); "
                                               f"the adapters do not fit other base weights")
    return base
