"""The VAE's formats. Project VAE parameter names are diffusers' `AutoencoderKLCogVideoX` names
(`cogvx_mega.vae.model` mirrors them), so diffusers <-> project is a strict identity with a shape check;
SAT names map by template. A project VAE checkpoint is format vae-single-v1; a VAE training checkpoint
(vae-train-v1, `cogvx vae train`) holds the same model.safetensors beside the discriminator and the optimizers, so
every reader of a VAE checkpoint takes it too.

SAT's released VAE is `<name>-sat/vae/3d-vae.pt`, a torch.save'd `{"state_dict": ...}`; a whole-engine SAT
checkpoint (a full fine-tune) holds the VAE as `first_stage_model.*`. Both are read like the SAT transformer
files (`read_sat_file`: weights-only unpickling, wrappers unwrapped)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from cogvx_mega.checkpoint.atomic import atomic_directory
from cogvx_mega.checkpoint.meta import (META_FILE, MODEL_FILE, VAE_FORMAT, VAE_TRAINING_FORMAT, ConversionError,
                                        is_project_checkpoint, read_checkpoint_meta)
from cogvx_mega.checkpoint.single_file import write_single_file_checkpoint
from cogvx_mega.checkpoint.transformer import SAT_LATEST_FILE, find_sat_transformer_file, read_sat_file
from cogvx_mega.checkpoint.weights import read_diffusers_weights


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


# SAT's VAE files also hold its training loss (`loss.*`: the LPIPS network, the discriminator, logvar), which
# SAT itself skips when it loads the VAE (`ignore_keys: ['loss']` in every CogVideoX config). Dropped by prefix;
# every other tensor must map.
_SAT_VAE_LOSS = "loss."
_SAT_ENGINE_VAE = "first_stage_model."  # the VAE inside a whole-engine SAT checkpoint
SAT_VAE_FILE = "3d-vae.pt"


def sat_vae_to_project(state: dict[str, Tensor], config) -> dict[str, Tensor]:
    """A SAT VAE state dict (a bare VAE checkpoint or a whole SAT model's `first_stage_model.*`)."""
    if any(k.startswith(_SAT_ENGINE_VAE) for k in state):
        state = {k[len(_SAT_ENGINE_VAE):]: v for k, v in state.items() if k.startswith(_SAT_ENGINE_VAE)}
    state = {k: v for k, v in state.items() if not k.startswith(_SAT_VAE_LOSS)}
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


def find_sat_vae_file(path: str | Path) -> Path:
    """The SAT file a user means by `path`: the file itself; a folder holding `3d-vae.pt` or `vae/3d-vae.pt`
    (a released `<name>-sat` folder); or a SAT transformer checkpoint folder of a full fine-tune (its
    `first_stage_model.*` is the VAE)."""
    location = Path(path)
    if location.is_file():
        return location
    for candidate in (location / SAT_VAE_FILE, location / "vae" / SAT_VAE_FILE):
        if candidate.is_file():
            return candidate
    if location.is_dir() and ((location / SAT_LATEST_FILE).is_file() or any(location.glob("mp_rank_*.pt"))):
        return find_sat_transformer_file(location)
    raise ConversionError(f"{path}: no such SAT VAE file; pass {SAT_VAE_FILE} (or the folder that holds it)")


def read_sat_vae(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The SAT-named state dict of a SAT VAE file or folder (`find_sat_vae_file`), read safely."""
    return read_sat_file(find_sat_vae_file(path), trust_pickle)


def _diffusers_vae_config(path: str):
    """(the folder holding the weights, VAEConfig) of a diffusers `AutoencoderKLCogVideoX` folder or a pipeline
    folder with vae/; reads config.json only."""
    from cogvx_mega.vae.config import vae_config_from_diffusers

    folder = Path(path)
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path}: no config.json; pass a diffusers AutoencoderKLCogVideoX folder")
    raw = json.loads(config_file.read_text())
    if raw.get("_class_name", "AutoencoderKLCogVideoX") != "AutoencoderKLCogVideoX":
        raise ConversionError(f"{path}: config is a {raw['_class_name']}, not an AutoencoderKLCogVideoX")
    return folder, vae_config_from_diffusers(raw)


def read_diffusers_vae_folder(path: str):
    """(VAEConfig, state) from a diffusers `AutoencoderKLCogVideoX` folder or a pipeline folder with vae/."""
    folder, config = _diffusers_vae_config(path)
    state = read_diffusers_weights(folder)
    check_vae_state(state, config)
    return config, state


def read_vae_weights(path: str, verify: bool = True):
    """(VAE config, state) of any VAE we read: a diffusers folder (or pipeline folder), a project VAE checkpoint or
    a VAE training step (verified first, unless `verify=False`)."""
    if is_project_checkpoint(path):
        return read_vae_checkpoint(str(path), verify)
    return read_diffusers_vae_folder(str(path))


def read_vae_config(path: str):
    """The VAEConfig of what `read_vae_weights` reads, from its metadata alone (no tensor read, nothing verified)."""
    from cogvx_mega.vae.config import vae_config_from_dict

    if not is_project_checkpoint(path):
        return _diffusers_vae_config(str(path))[1]
    meta = _vae_meta(path)
    return vae_config_from_dict(meta["vae"])


def _vae_meta(path) -> dict:
    meta = read_checkpoint_meta(path)
    if meta.get("format") not in (VAE_FORMAT, VAE_TRAINING_FORMAT):
        raise ConversionError(f"{path}: a {meta.get('format')} checkpoint, not a VAE ({VAE_FORMAT} or "
                              f"{VAE_TRAINING_FORMAT})")
    return meta


def write_diffusers_vae_folder(state: dict[str, Tensor], config, path: str) -> Path:
    from safetensors.torch import save_file

    from cogvx_mega.vae.config import vae_config_to_diffusers

    check_vae_state(state, config)
    with atomic_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(vae_config_to_diffusers(config), indent=2))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "diffusion_pytorch_model.safetensors"))
    return Path(path)


def save_vae_checkpoint(path: str, state: dict[str, Tensor], config, extra: Optional[dict] = None) -> Path:
    """A project VAE checkpoint: model.safetensors + cogvx_checkpoint.json (format vae-single-v1), atomic."""
    check_vae_state(state, config)
    return write_single_file_checkpoint(path, state, {"format": VAE_FORMAT, "vae": dataclasses.asdict(config),
                                                      **(extra or {})})


def read_vae_checkpoint(path: str, verify: bool = True):
    """(VAE config, state) of a project VAE checkpoint, its file verified first (`verify`)."""
    from safetensors.torch import load_file

    from cogvx_mega.checkpoint.verify import refuse_damaged
    from cogvx_mega.vae.config import vae_config_from_dict

    if verify:
        refuse_damaged(path)
    config = vae_config_from_dict(_vae_meta(path)["vae"])
    state = load_file(str(Path(path) / MODEL_FILE))
    check_vae_state(state, config)
    return config, state


DISCRIMINATOR_FILE = "discriminator.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def save_vae_training_checkpoint(path: str | Path, vae_state: dict[str, Tensor], config, meta: dict,
                                 discriminator_state: Optional[dict[str, Tensor]], optimizers: dict) -> Path:
    """One VAE training step (vae-train-v1), written by one process (every rank holds the same replica): the VAE
    (model.safetensors), the discriminator, the optimizers' states (optimizer.pt) and the metadata with every
    file's size and CRC32C, written last, atomically (`atomic_directory`)."""
    from safetensors.torch import save_file

    from cogvx_mega.checkpoint import faults
    from cogvx_mega.checkpoint.verify import record_files

    check_vae_state(vae_state, config)
    with atomic_directory(path) as tmp:
        names = [MODEL_FILE, OPTIMIZER_FILE]
        save_file({k: v.detach().cpu().contiguous() for k, v in vae_state.items()}, str(tmp / MODEL_FILE))
        if discriminator_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in discriminator_state.items()},
                      str(tmp / DISCRIMINATOR_FILE))
            names.append(DISCRIMINATOR_FILE)
        torch.save(optimizers, tmp / OPTIMIZER_FILE)
        faults.maybe_kill("save", int(meta["step"]), "after-write")
        (tmp / META_FILE).write_text(json.dumps({"format": VAE_TRAINING_FORMAT, **meta,
                                                 "vae": dataclasses.asdict(config),
                                                 "files": record_files(tmp, names)}, indent=2))
        faults.maybe_kill("rename", int(meta["step"]))
    return Path(path)


def read_vae_training_checkpoint(path: str | Path) -> tuple[dict, dict[str, Tensor], Optional[dict[str, Tensor]], dict]:
    """(metadata, VAE state, discriminator state or None, optimizer states) of a vae-train-v1 folder (verified
    by the caller: `training.checkpoint.find_resume_checkpoint`)."""
    from safetensors.torch import load_file

    meta = read_checkpoint_meta(path)
    if meta.get("format") != VAE_TRAINING_FORMAT:
        raise ConversionError(f"{path}: a {meta.get('format')} checkpoint, not a VAE training step "
                              f"({VAE_TRAINING_FORMAT})")
    folder = Path(path)
    discriminator = folder / DISCRIMINATOR_FILE
    return (meta, load_file(str(folder / MODEL_FILE)),
            load_file(str(discriminator)) if discriminator.is_file() else None,
            torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
