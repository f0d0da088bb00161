"""Training from a latent cache: the order is a pure function of (seed, epoch), every batch is one bucket,
data-parallel ranks take disjoint slots that together cover the epoch, a resume mid-epoch at another
data-parallel size reads the same samples, and `cogvx train --data cache.zarr` trains (loss going down)."""
from __future__ import annotations

import json

import pytest
import torch

from cogvx_mega.cli import main

BUCKETS = "data.buckets=[5x32x48,1x32x32]"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from diffusers import AutoencoderKLCogVideoX
    from media import make_media_folder
    from text_encoder import make_tiny_t5

    root = tmp_path_factory.mktemp("reader")
    make_media_folder(root / "media")
    assert main(["data", "scan", str(root / "media"), "--output", str(root / "manifest.jsonl")]) == 0
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                                 latent_channels=4)
    with torch.no_grad():  # a sharp posterior, as a trained VAE has (std e^-4): the latents carry the video
        vae.encoder.conv_out.conv.weight[4:] = 0.0
        vae.encoder.conv_out.conv.bias[4:] = -8.0
    vae.save_pretrained(root / "vae")
    make_tiny_t5(root / "t5")
    assert main(["data", "encode", "--manifest", str(root / "manifest.jsonl"), "--vae", str(root / "vae"),
                 "--text-encoder", str(root / "t5"), "--output", str(root / "cache.zarr"), "--preset", "tiny",
                 BUCKETS, "--shard-clips", "2"]) == 0
    return root / "cache.zarr"


def test_order_ranks_and_epochs(cache):
    from cogvx_mega.data.cache_reader import CacheDataset

    data = CacheDataset(str(cache))
    assert {k: len(v) for k, v in data.usable.items()} == {"1x32x32": 2, "5x32x48": 4}
    per = data.batches_per_epoch(2)
    assert per == 3
    batches = [data.batch_of_step(step, 2, seed=5) for step in range(2 * per)]
    assert batches == [CacheDataset(str(cache)).batch_of_step(step, 2, seed=5) for step in range(2 * per)]
    assert batches != [data.batch_of_step(step, 2, seed=6) for step in range(2 * per)]
    for epoch in range(2):  # every clip exactly once per epoch, each batch from one bucket
        seen = sorted((bucket, clip) for bucket, clips in batches[epoch * per:(epoch + 1) * per] for clip in clips)
        assert seen == sorted((bucket, clip) for bucket, clips in data.usable.items() for clip in clips)
    assert batches[:per] != batches[per:]  # a new shuffle every epoch


def test_ranks_are_disjoint_and_a_resume_at_another_size_reads_the_same(cache):
    from cogvx_mega.data.cache_reader import CacheDataset

    one = [CacheDataset(str(cache)).step_batch(step, range(0, 2), 2, seed=3) for step in range(4)]
    for step in range(4):  # two ranks, each with a fresh reader started at this step (a resume mid-epoch)
        halves = [CacheDataset(str(cache)).step_batch(step, range(r, r + 1), 2, seed=3) for r in range(2)]
        for key in ("latents", "text_embeds"):
            assert torch.equal(torch.cat([h[key] for h in halves]), one[step][key]), (step, key)
        assert not torch.equal(halves[0]["latents"], halves[1]["latents"])  # different clips (and noise)


def test_latents_are_fresh_posterior_samples_of_the_cached_moments(cache):
    import zarr

    from cogvx_mega.data.cache_reader import CacheDataset
    from cogvx_mega.diffusion.randomness import Stream, slot_normal

    data = CacheDataset(str(cache))
    bucket, clips = data.batch_of_step(0, 2, seed=3)
    group = zarr.open_group(str(cache), mode="r")
    mean = torch.from_numpy(group[f"{bucket}/mean"][clips])
    std = torch.exp(0.5 * torch.from_numpy(group[f"{bucket}/logvar"][clips]))
    noise = slot_normal(mean.shape[1:], range(2), seed=3, step=0, stream=Stream.VAE_POSTERIOR)
    expected = ((mean + std * noise) * group.attrs["scaling_factor"]).permute(0, 2, 1, 3, 4)
    batch = data.step_batch(0, range(2), 2, seed=3)
    assert torch.allclose(batch["latents"], expected, atol=1e-6)
    again = data.step_batch(1, range(2), 2, seed=3)  # another step: other noise even for the same clips
    assert not torch.equal(batch["latents"], again["latents"])


def test_train_from_the_cache(cache, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(cache), "--steps", "20", "--run-dir", str(run), BUCKETS,
                 "training.micro_batch_size=2", "training.warmup_steps=0", "training.lr=3e-3",
                 "diffusion.text_dropout=0.0"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows]
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5]), losses
