"""Every command that reads a checkpoint verifies it the way a resume does: a bit-flipped file makes `cogvx
convert`, `cogvx sample`, `cogvx export` and `cogvx train --init-from` (and `from_pretrained`) stop with one line
naming the file, exit 2, nothing written; `--no-verify` (verify=False) reads it as it is. Single-file checkpoints
record their file's size and CRC32C as sharded ones do."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from families import make_diffusers_model

from cogvx_mega.cli import EXIT_USER_ERROR, main

TINY_TRAIN = ["train", "--preset", "tiny", "--device", "cpu", "data.num_synthetic_clips=8", "--steps", "2"]


def flip_a_byte(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return path.name


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers import AutoencoderKLCogVideoX
    from safetensors.torch import save_file

    from text_encoder import make_tiny_t5

    root = tmp_path_factory.mktemp("verified")
    make_diffusers_model("rope-5b", std=0.1).save_pretrained(root / "transformer")
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=4).save_pretrained(root / "vae")
    make_tiny_t5(root / "t5", d_model=12)
    save_file({"prompt_embeds": torch.randn(1, 5, 12)}, str(root / "prompt.safetensors"))
    assert main(["convert", "diffusers-to-project", str(root / "transformer"), str(root / "single")]) == 0
    shutil.copytree(root / "single", root / "single-damaged")
    damaged = flip_a_byte(root / "single-damaged" / "model.safetensors")
    assert main([*TINY_TRAIN, "--run-dir", str(root / "run")]) == 0
    sharded = root / "sharded-damaged"
    shutil.copytree(root / "run" / "checkpoints" / "step_00000002", sharded)
    shard = flip_a_byte(sorted(sharded.glob("__0_*.distcp"))[0])
    return root, damaged, shard


def refused(capsys, argv, file_name, written):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USER_ERROR and len(err) == 1, err
    assert "is damaged" in err[0] and file_name in err[0] and "--no-verify" in err[0], err
    assert not Path(written).exists()


def test_single_file_checkpoints_record_their_file(assets):
    root, _, _ = assets
    files = json.loads((root / "single" / "cogvx_checkpoint.json").read_text())["files"]
    assert set(files) == {"model.safetensors"}
    assert main(["checkpoint", "verify", str(root / "single")]) == 0
    assert main(["checkpoint", "verify", str(root / "single-damaged")]) == 1


def test_convert_export_and_sample_refuse_a_damaged_checkpoint(assets, tmp_path, capsys):
    root, damaged, shard = assets
    for source, name in ((root / "single-damaged", damaged), (root / "sharded-damaged", shard)):
        refused(capsys, ["convert", "project-to-diffusers", str(source), str(tmp_path / "out")], name,
                tmp_path / "out")
    refused(capsys, ["export", "diffusers", "--ckpt", str(root / "single-damaged"), "--vae", str(root / "vae"),
                     "--text-encoder", str(root / "t5"), "--out", str(tmp_path / "release")], damaged,
            tmp_path / "release")
    refused(capsys, ["sample", "--ckpt", str(root / "single-damaged"), "--vae", str(root / "vae"), "--prompt-embeds",
                     str(root / "prompt.safetensors"), "--steps", "2", "--frames", "9", "--size", "32x48",
                     "--output", str(tmp_path / "clip.mp4"), "--device", "cpu"], damaged, tmp_path / "clip.mp4")
    # --no-verify reads it as it is
    assert main(["convert", "project-to-diffusers", str(root / "single-damaged"), str(tmp_path / "out"),
                 "--no-verify"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_init_from_a_damaged_checkpoint_is_refused_before_anything_is_written(assets, tmp_path, capsys):
    root, _, shard = assets
    refused(capsys, [*TINY_TRAIN, "--run-dir", str(tmp_path / "run"), "--init-from", str(root / "sharded-damaged")],
            shard, tmp_path / "run")
    assert main([*TINY_TRAIN, "--run-dir", str(tmp_path / "run"), "--init-from", str(root / "sharded-damaged"),
                 "--no-verify"]) == 0


def test_from_pretrained_verifies_unless_told_not_to(assets):
    import cogvx_mega
    from cogvx_mega.config.errors import ConfigError

    root, damaged, _ = assets
    with pytest.raises(ConfigError, match=f"is damaged: {damaged}"):
        cogvx_mega.from_pretrained(str(root / "single-damaged"))
    intact = cogvx_mega.from_pretrained(str(root / "single"))
    as_is = cogvx_mega.from_pretrained(str(root / "single-damaged"), verify=False)
    differing = [name for name, value in as_is.state_dict().items()
                 if torch.is_tensor(value) and not torch.equal(value, intact.state_dict()[name])]
    assert len(differing) == 1  # the flipped byte changed one tensor, read as it is
