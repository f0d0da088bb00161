"""Two ranks encoding one latent cache at once write the same store as one rank alone."""
from __future__ import annotations

import json

import numpy as np
import pytest

from launcher import run_ranks


def encode(rank: int, world_size: int, args: list) -> int:
    from cogvx_mega.cli import main

    return main(args)


@pytest.mark.timeout(240)
def test_two_ranks_write_the_same_cache_as_one(tmp_path):
    import zarr
    from diffusers import AutoencoderKLCogVideoX
    from media import make_media_folder
    from text_encoder import make_tiny_t5

    from cogvx_mega.cli import main
    from cogvx_mega.data.cache import clip_paths, committed

    make_media_folder(tmp_path / "media")
    manifest = tmp_path / "manifest.jsonl"
    assert main(["data", "scan", str(tmp_path / "media"), "--output", str(manifest)]) == 0
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=4).save_pretrained(tmp_path / "vae")
    make_tiny_t5(tmp_path / "t5")

    def args(output):
        return ["data", "encode", "--manifest", str(manifest), "--vae", str(tmp_path / "vae"), "--text-encoder",
                str(tmp_path / "t5"), "--output", str(output), "--preset", "tiny", "data.buckets=[5x32x48,1x32x32]",
                "--shard-clips", "1", "--device", "cpu"]

    assert run_ranks(1, encode, args(tmp_path / "one.zarr")) == [0]
    assert run_ranks(2, encode, args(tmp_path / "two.zarr")) == [0, 0]
    one, two = (zarr.open_group(str(tmp_path / name), mode="r") for name in ("one.zarr", "two.zarr"))
    assert json.dumps(one.attrs.asdict(), sort_keys=True) == json.dumps(two.attrs.asdict(), sort_keys=True)
    for bucket in one.attrs["buckets"]:
        assert clip_paths(tmp_path / "one.zarr", bucket) == clip_paths(tmp_path / "two.zarr", bucket)
        for name in ("mean", "logvar", "first_frame", "text_row"):
            assert np.array_equal(one[f"{bucket}/{name}"][:], two[f"{bucket}/{name}"][:]), (bucket, name)
    assert np.array_equal(one["text"][:], two["text"][:])
    assert committed(tmp_path / "one.zarr") == committed(tmp_path / "two.zarr")
