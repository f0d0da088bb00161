"""SAT checkpoints in SAT's own file layouts, converted and compared with diffusers on the same weights.

SAT (SwissArmyTransformer, the CogVideoX authors' training code) saves through DeepSpeed: `<dir>/latest` names
the iteration, `<dir>/<iteration>/mp_rank_00_model_states.pt` is a dict whose `module` is the state dict, beside
DeepSpeed's bookkeeping and SAT's client state (`iteration`, `client_lr_scheduler`, the RNG states). The released
`<name>-sat` downloads hold `transformer/` in that layout and `vae/3d-vae.pt` as `{"state_dict": ...}`. Every RoPE
checkpoint also carries SAT's unused `transformer.position_embeddings` (and the 1.0 code's RoPE buffers), the 2B
its fixed sin-cos table. Files are read with torch's weights-only unpickler; code in a pickle is refused unless
--trust-pickle.
"""
from __future__ import annotations

import argparse
import random
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from families import FAMILIES, make_diffusers_model, pipeline_rope
from test_parity_diffusers import TOLERANCE, random_inputs, sat_state_from_diffusers

import cogvx_mega
from cogvx_mega.checkpoint import transformer as convert
from cogvx_mega.checkpoint.meta import ConversionError
from cogvx_mega.cli import EXIT_USER_ERROR, main

P = "model.diffusion_model."
PRESET_OF = {"sincos-2b": "cogvideox-2b", "rope-5b": "cogvideox-5b", "i2v-5b": "cogvideox-5b-i2v",
             "v15-5b": "cogvideox1.5-5b", "v15-i2v": "cogvideox1.5-5b-i2v"}
ITERATION = 1000


# --- SAT's layouts, written the way SAT and DeepSpeed write them --------------------------------------------

def sat_transformer_state(family: str, reference) -> OrderedDict:
    """The state dict SAT's CogVideoX model of this family saves: the weights under SAT's names plus what SAT
    creates and this project does not load."""
    cfg = reference.config
    state = sat_state_from_diffusers(reference)
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    if not cfg.use_rotary_positional_embeddings:  # 2B: Basic3DPositionEmbeddingMixin's frozen sin-cos table
        state[P + "mixins.pos_embed.pos_embedding"] = reference.patch_embed.pos_embedding.clone()
    else:  # BaseTransformer's nn.Embedding(max_sequence_length=64, hidden), never deleted by the RoPE mixin
        state[P + "transformer.position_embeddings.weight"] = torch.randn(64, hidden)
        if cfg.patch_size_t is None:  # the 1.0 code registers the RoPE tables as buffers [T*H*W, head_dim]
            tokens = ((cfg.sample_frames - 1) // 4 + 1) * (cfg.sample_height // 2) * (cfg.sample_width // 2)
            angles = torch.rand(tokens, cfg.attention_head_dim)
            state[P + "mixins.pos_embed.freqs_sin"] = angles.sin()
            state[P + "mixins.pos_embed.freqs_cos"] = angles.cos()
    return OrderedDict(sorted(state.items()))


def deepspeed_model_states(state: OrderedDict, **extra) -> dict:
    """What SAT's save_checkpoint writes to mp_rank_00_model_states.pt: DeepSpeed's engine state (bf16 / ZeRO
    stage 2: the optimizer lives in other files) and SAT's client state with its RNG states."""
    return {
        "module": state,
        "buffer_names": [k for k in state if k.endswith(("freqs_sin", "freqs_cos"))],
        "optimizer": None,
        "param_shapes": [OrderedDict((k, v.shape) for k, v in state.items())],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": ITERATION,
        "global_samples": 8 * ITERATION,
        "dp_world_size": 8,
        "mp_world_size": 1,
        "ds_config": {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                      "bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
                      "optimizer": {"type": "sat.ops.FusedEmaAdam", "params": {"lr": 1e-5}}},
        "ds_version": "0.14.4",
        "iteration": ITERATION,
        "client_lr_scheduler": {"start_lr": 1e-5, "warmup_iter": 100, "num_iters": ITERATION,
                                "decay_style": "constant", "end_iter": ITERATION, "decay_ratio": 0.1},
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),  # a ByteTensor, as torch.cuda.get_rng_state() gives
        "args": argparse.Namespace(mode="finetune", save="ckpts", lr=1e-5, bf16=True, seed=42),
        **extra,
    }


def write_sat_checkpoint(folder: Path, blob, tag: str = str(ITERATION)) -> Path:
    """SAT's folder: `latest` naming the tag, `<tag>/mp_rank_00_model_states.pt`."""
    (folder / tag).mkdir(parents=True)
    torch.save(blob, folder / tag / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text(tag)
    return folder / tag / "mp_rank_00_model_states.pt"


def family_overrides(family: str, tmp_path: Path) -> list[str]:
    """--preset, --config and overrides that describe the tiny diffusers model of `family`."""
    model = {k: v for k, v in FAMILIES[family].items() if not k.startswith("use_")}
    config_file = tmp_path / f"{family}.yaml"
    config_file.write_text(yaml.safe_dump({"model": model}))
    frames = 13 if model.get("patch_size_t") else 9
    return ["--preset", PRESET_OF[family], "--config", str(config_file), "data.height=64", "data.width=96",
            f"data.num_frames={frames}"]


def run_cli(args, capsys):
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err.strip().splitlines()


_REFERENCES: dict[str, torch.nn.Module] = {}


def reference_model(family: str):
    if family not in _REFERENCES:
        _REFERENCES[family] = make_diffusers_model(family)
    return _REFERENCES[family]


# --- the transformer: every family -------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sat_checkpoint_folder_converts_to_the_diffusers_model(family, tmp_path, capsys):
    reference = reference_model(family)
    write_sat_checkpoint(tmp_path / "sat", deepspeed_model_states(sat_transformer_state(family, reference)))
    status, lines = run_cli(["convert", "sat-to-project", tmp_path / "sat", tmp_path / "ours",
                             *family_overrides(family, tmp_path)], capsys)
    assert status == 0, lines

    ours = cogvx_mega.from_pretrained(str(tmp_path / "ours"))
    model_config = convert.model_config_from_diffusers(dict(reference.config))
    expected = convert.diffusers_to_project(reference.state_dict(), model_config)
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k].to(state[k].dtype)) for k in expected)  # diffusers' I2V table: fp64

    frames = 4 if reference.config.patch_size_t else 3
    latents, text, timesteps, extra = random_inputs(reference.config, frames, 8, 12)
    with torch.no_grad():
        wanted = reference(latents, text, timesteps, image_rotary_emb=pipeline_rope(reference, frames, 8, 12),
                           return_dict=False, **extra)[0]
        difference = (ours(latents, text, timesteps, **extra) - wanted).abs().max().item()
    assert difference <= TOLERANCE, f"{family}: max |diff| {difference:.3e}"


def test_every_path_a_user_passes_reads_the_same_file(tmp_path):
    """The .pt file, its iteration folder, the checkpoint folder (through `latest`, also an `-ema` tag SAT's EMA
    save writes) and a released `<name>-sat` folder (its transformer/ is the checkpoint folder)."""
    state = OrderedDict([(P + "time_embed.0.weight", torch.randn(3, 2))])
    release = tmp_path / "CogVideoX-5b-sat"
    file = write_sat_checkpoint(release / "transformer", deepspeed_model_states(state))
    newer = OrderedDict([(P + "time_embed.0.weight", torch.randn(3, 2))])
    training = tmp_path / "ckpts"
    write_sat_checkpoint(training, deepspeed_model_states(state), tag="500")
    (training / "latest").unlink()
    write_sat_checkpoint(training, deepspeed_model_states(newer), tag="1000-ema")

    key = P + "time_embed.0.weight"
    for path in (file, file.parent, release / "transformer", release):
        read = convert.read_sat_transformer(path)
        assert read.keys() == state.keys() and torch.equal(read[key], state[key]), path
    assert torch.equal(convert.read_sat_transformer(training)[key], newer[key])


def test_plain_and_wrapped_state_dicts_are_read(tmp_path):
    """`module` (DeepSpeed), `state_dict` (Lightning, SAT's VAE file), `model`, nested, or no wrapper at all."""
    state = {P + "time_embed.0.weight": torch.randn(3, 2)}
    for name, blob in {"bare": state, "module": {"module": state, "iteration": 1},
                       "state_dict": {"state_dict": state, "global_step": 3},
                       "model": {"model": state}, "nested": {"model": {"module": state}}}.items():
        torch.save(blob, tmp_path / f"{name}.pt")
        assert convert.read_sat_file(tmp_path / f"{name}.pt").keys() == state.keys(), name


def test_a_file_written_under_numpy_1_reads(tmp_path):
    """CogVideoX's SAT files were written under numpy 1, whose RNG-state array pickles as
    `numpy.core.multiarray._reconstruct` (numpy 2 says `numpy._core`); torch's older, non-zip format too."""
    blob = {"module": {P + "time_embed.0.weight": torch.ones(2)}, "np_rng_state": np.random.get_state()}
    torch.save(blob, tmp_path / "new.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "new.pt").read_bytes()
    assert b"numpy._core.multiarray" in data or b"numpy.core.multiarray" in data
    (tmp_path / "old.pt").write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert torch.equal(convert.read_sat_file(tmp_path / "old.pt")[P + "time_embed.0.weight"], torch.ones(2))


@pytest.mark.parametrize("family, extra", [
    ("rope-5b", P + "mixins.lora.layers.0.matrix_A.0"),  # a LoRA fine-tune's adapter, not this model's weight
    ("sincos-2b", P + "transformer.position_embeddings.weight"),  # SAT's 2B deletes it: here it is unknown
    ("rope-5b", P + "mixins.pos_embed.pos_embedding"),  # learned positions belong to the I2V family only
])
def test_an_unknown_tensor_is_refused_by_name(family, extra, tmp_path, capsys):
    state = sat_transformer_state(family, reference_model(family))
    state[extra] = torch.zeros(4, 4)
    write_sat_checkpoint(tmp_path / "sat", deepspeed_model_states(state))
    status, lines = run_cli(["convert", "sat-to-project", tmp_path / "sat", tmp_path / "out",
                             *family_overrides(family, tmp_path)], capsys)
    assert status == EXIT_USER_ERROR and len(lines) == 1, lines
    assert lines[0].startswith("cogvx: error:") and extra in lines[0] and "1 tensor " in lines[0]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- untrusted pickles -------------------------------------------------------------------------------------

def leave_marker(path: str) -> argparse.Namespace:
    """What a pickle can make `torch.load(weights_only=False)` run: here it only writes a file."""
    Path(path).write_text("ran")
    return argparse.Namespace()


class CodeInAPickle:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return leave_marker, (self.marker,)


def test_code_in_a_pickle_is_refused_unless_trusted(tmp_path, capsys):
    family = "rope-5b"
    marker = tmp_path / "marker"
    blob = deepspeed_model_states(sat_transformer_state(family, reference_model(family)),
                                  args=CodeInAPickle(marker))
    write_sat_checkpoint(tmp_path / "sat", blob)
    arguments = ["convert", "sat-to-project", tmp_path / "sat", tmp_path / "out", *family_overrides(family, tmp_path)]
    status, lines = run_cli(arguments, capsys)
    assert status == EXIT_USER_ERROR and len(lines) == 1, lines
    assert re.search(r"refused to unpickle \S*leave_marker", lines[0]) and "--trust-pickle" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()

    status, lines = run_cli([*arguments, "--trust-pickle"], capsys)
    assert status == 0, lines
    assert marker.read_text() == "ran" and (tmp_path / "out").is_dir()


def test_trust_pickle_is_refused_where_nothing_is_unpickled(tmp_path, capsys):
    (tmp_path / "diffusers").mkdir()
    status, lines = run_cli(["convert", "diffusers-to-project", tmp_path / "diffusers", tmp_path / "out",
                             "--trust-pickle"], capsys)
    assert status == EXIT_USER_ERROR and len(lines) == 1 and "--trust-pickle" in lines[0]


@pytest.mark.parametrize("layout, needle", [
    ("junk", "not a torch checkpoint (it begins with b'<!DOCTYP'"),
    ("git lfs pointer", "a Git LFS pointer"),
    ("no latest", "no mp_rank_00_model_states.pt and no 'latest' file"),
    ("latest names nothing", "names iteration '2000'"),
    ("model parallel", "model-parallel SAT checkpoint (2 mp_rank files)"),
    ("zero-3", "ZeRO-3"),
    ("not a state dict", "no single state dict"),
    ("tensors and other things", "not tensors"),
])
def test_a_file_that_is_not_a_sat_checkpoint_is_one_line(layout, needle, tmp_path, capsys):
    source = tmp_path / "sat"
    source.mkdir()
    state = {P + "time_embed.0.weight": torch.zeros(2)}
    if layout == "junk":  # a download that failed
        (source / "mp_rank_00_model_states.pt").write_text("<!DOCTYPE html><html>Not found</html>")
    elif layout == "git lfs pointer":  # a clone without git-lfs
        (source / "mp_rank_00_model_states.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    elif layout == "latest names nothing":
        (source / "latest").write_text("2000")
    elif layout == "model parallel":
        for rank in range(2):
            torch.save({"module": state}, source / f"mp_rank_0{rank}_model_states.pt")
    elif layout == "zero-3":
        torch.save({"module": state}, source / "z3_rank_00_model_states.pt")
    elif layout == "not a state dict":
        torch.save({"iteration": 3, "optimizer": None}, source / "mp_rank_00_model_states.pt")
    elif layout == "tensors and other things":
        torch.save({**state, "step": 3}, source / "mp_rank_00_model_states.pt")
    with pytest.raises(ConversionError, match=re.escape(needle)):
        convert.read_sat_transformer(source)
    status, lines = run_cli(["convert", "sat-to-project", source, tmp_path / "out", "--preset", "cogvideox-5b"],
                            capsys)
    assert status == EXIT_USER_ERROR and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "out").exists()


# --- the VAE -----------------------------------------------------------------------------------------------

def sat_vae_name(key: str, blocks: int) -> str:
    """SAT's name of a diffusers AutoencoderKLCogVideoX parameter (its released 3d-vae.pt's names)."""
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.",
                 key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample.", key)
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def test_sat_vae_file_converts_to_the_diffusers_vae(tmp_path, capsys):
    from diffusers import AutoencoderKLCogVideoX

    from cogvx_mega.vae import vae_preset
    from cogvx_mega.vae.config import vae_config_to_diffusers

    config = vae_preset("tiny")
    torch.manual_seed(0)
    reference = AutoencoderKLCogVideoX.from_config(vae_config_to_diffusers(config)).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn_like(param))
    blocks = len(config.block_out_channels)
    sat = OrderedDict((sat_vae_name(k, blocks), v) for k, v in reference.state_dict().items())
    assert "decoder.up.1.upsample.conv.weight" in sat and "encoder.mid.block_1.conv1.conv.weight" in sat
    sat["loss.logvar"] = torch.zeros(())  # SAT's training loss, skipped by SAT's own loader (ignore_keys: loss)
    sat["loss.discriminator.blocks.0.weight"] = torch.zeros(2, 2)
    release = tmp_path / "CogVideoX-2b-sat"
    (release / "vae").mkdir(parents=True)
    torch.save({"state_dict": sat}, release / "vae" / "3d-vae.pt")

    for source, out in ((release / "vae" / "3d-vae.pt", "from-file"), (release, "from-folder")):
        status, lines = run_cli(["convert", "vae-sat-to-project", source, tmp_path / out, "--preset", "tiny"], capsys)
        assert status == 0, lines
    ours = cogvx_mega.load_vae(str(tmp_path / "from-folder"))
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in reference.state_dict().items())
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents = reference.encode(video).latent_dist.mean
        assert (ours.encode(video) - latents).abs().max().item() <= TOLERANCE
        assert (ours.decode(latents) - reference.decode(latents).sample).abs().max().item() <= TOLERANCE

    sat["decoder.up.0.block.0.extra"] = torch.zeros(1)  # a tensor the VAE has no place for: one line naming it
    torch.save({"state_dict": sat}, tmp_path / "bad.pt")
    status, lines = run_cli(["convert", "vae-sat-to-project", tmp_path / "bad.pt", tmp_path / "bad", "--preset",
                             "tiny"], capsys)
    assert status == EXIT_USER_ERROR and len(lines) == 1 and "decoder.up.0.block.0.extra" in lines[0], lines
    assert not (tmp_path / "bad").exists()
