"""Training from a latent cache: the order is a pure function of (seed, epoch), every batch is one bucket,
data-parallel ranks take disjoint slots that together cover the epoch, a resume mid-epoch at another
data-parallel size reads the same samples, and `cogvx train --data cache.zarr` trains (loss going down)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cogvx_mega.cli import main

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny-videos.yaml")


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
                 "--text-encoder", str(root / "t5"), "--output", str(root / "cache.zarr"), "--config", EXAMPLE,
                 "--shard-clips", "2"]) == 0
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
    assert group[f"{bucket}/mean"].dtype == "float16"  # stored in 16 bits, read back as float32
    mean = torch.from_numpy(group[f"{bucket}/mean"][clips].astype("float32"))
    std = torch.exp(0.5 * torch.from_numpy(group[f"{bucket}/logvar"][clips].astype("float32")))
    noise = slot_normal(mean.shape[1:], range(2), seed=3, step=0, stream=Stream.VAE_POSTERIOR)
    expected = ((mean + std * noise) * group.attrs["scaling_factor"]).permute(0, 2, 1, 3, 4)
    batch = data.step_batch(0, range(2), 2, seed=3)
    assert torch.allclose(batch["latents"], expected, atol=1e-6)
    again = data.step_batch(1, range(2), 2, seed=3)  # another step: other noise even for the same clips
    assert not torch.equal(batch["latents"], again["latents"])


TRAIN_ARGS = ["--config", EXAMPLE]  # 20 steps of the example, as its comment runs them


def losses_of(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache_losses(cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("cache-run")
    assert main(["train", "--data", str(cache), "--run-dir", str(run), *TRAIN_ARGS]) == 0
    return losses_of(run)


def test_train_from_the_cache(cache_losses):
    assert len(cache_losses) == 20 and sum(cache_losses[-5:]) < sum(cache_losses[:5]), cache_losses


def test_online_mode_gives_the_losses_of_the_cache(cache, cache_losses, tmp_path):
    root = cache.parent  # the manifest, VAE and T5 the cache was encoded from
    run = tmp_path / "online"
    assert main(["train", "--data", str(root / "manifest.jsonl"), "--vae", str(root / "vae"), "--text-encoder",
                 str(root / "t5"), "--run-dir", str(run), *TRAIN_ARGS, "data.online_keep_clips=3"]) == 0
    online = losses_of(run)  # 3 kept clips of 6: later epochs decode and encode again
    assert len(online) == 20
    assert max(abs(a - b) / abs(b) for a, b in zip(online, cache_losses)) <= 1e-6, (online, cache_losses)


def test_online_mode_replaces_a_clip_that_does_not_decode(cache, tmp_path, caplog):
    from cogvx_mega.config import load_config
    from cogvx_mega.data.cache import stored
    from cogvx_mega.data.text import T5TextEncoder
    from cogvx_mega.tools.training_data import open_training_data

    root = cache.parent
    lines = (root / "manifest.jsonl").read_text().splitlines()
    broken = [json.loads(line) for line in lines]
    video = next(i for i, r in enumerate(broken) if r["kind"] == "video")
    broken[video]["path"] = str(tmp_path / "gone.mp4")  # its file is gone since the scan
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in broken))
    config = load_config(config_file=EXAMPLE, overrides=[f"data.source='{manifest}'", f"data.vae='{root / 'vae'}'",
                                                         f"data.text_encoder='{root / 't5'}'"])
    data = open_training_data(config)
    t5 = T5TextEncoder(str(root / "t5"), max_length=config.model.max_text_seq_length)
    videos = data.plan.clips["5x32x48"]
    gone = next(i for i, r in enumerate(videos) if r["path"].endswith("gone.mp4"))
    step = next(s for s in range(8) if data.batch_of_step(s, 2, seed=1)[0] == "5x32x48"
                and gone in data.batch_of_step(s, 2, seed=1)[1])
    clips = data.batch_of_step(step, 2, seed=1)[1]
    batch = data.step_batch(step, range(2), 2, seed=1)
    assert batch["latents"].shape[0] == 2  # still a full batch
    assert list(data.skipped) == [("5x32x48", gone)] and "gone.mp4" in caplog.text
    slot = clips.index(gone)
    replacement = videos[(gone + 1) % len(videos)]  # the next clip of the bucket takes its place
    expected = torch.from_numpy(stored(t5.encode([replacement["caption"]])[0].numpy()))  # as a cache stores it
    assert torch.allclose(batch["text_embeds"][slot], expected, atol=1e-6)
    data.close()


def test_packs_from_the_cache_hold_posterior_samples_keyed_on_each_clip_slot(cache):
    import zarr

    from cogvx_mega.config import load_config
    from cogvx_mega.data.cache_reader import CacheDataset
    from cogvx_mega.data.packing import PackedDataset
    from cogvx_mega.diffusion.randomness import Stream, slot_normal

    config = load_config(config_file=EXAMPLE)
    source = CacheDataset(str(cache))
    packed = PackedDataset(source, config.model, pack_tokens=64, seed=3)
    assert len(packed) == len(source)  # every usable clip of every bucket is packed
    group = zarr.open_group(str(cache), mode="r")
    batch = packed.step_batch(1, range(2), 2, seed=3)
    slots = [slot for pack in batch["packs"] for slot in pack["slots"]]
    assert slots == list(range(batch["clips_in_step"]))  # the step's clips, pack by pack
    for pack, refs in zip(batch["packs"], packed.plan.step_packs(1, 2)):
        for latents, text, slot, (bucket, index) in zip(pack["latents"], pack["text_embeds"], pack["slots"],
                                                        refs.clips):
            mean = torch.from_numpy(group[f"{bucket}/mean"][index].astype("float32"))
            std = torch.exp(0.5 * torch.from_numpy(group[f"{bucket}/logvar"][index].astype("float32")))
            noise = slot_normal(mean.shape, [slot], seed=3, step=1, stream=Stream.VAE_POSTERIOR)[0]
            expected = ((mean + std * noise) * group.attrs["scaling_factor"]).permute(1, 0, 2, 3)
            assert torch.allclose(latents, expected, atol=1e-6)
            row = int(group[f"{bucket}/text_row"][index])  # the row of its caption in the deduplicated text
            assert torch.equal(text, torch.from_numpy(group["text"][row].astype("float32")))


def test_train_packed_from_the_cache(cache, tmp_path):
    run = tmp_path / "packed"
    assert main(["train", "--data", str(cache), "--run-dir", str(run), *TRAIN_ARGS, "--steps", "3",
                 "data.packing=true", "data.pack_tokens=64", "training.micro_batch_size=1",
                 "training.global_batch_size=2"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3
    for m in metrics:  # the packs' real tokens over 2 packs x 64 tokens, as the trainer reports it
        assert 0 < m["packing_efficiency"] <= 1 and m["clips"] >= 2
        assert m["tokens_per_s"] == pytest.approx(m["packing_efficiency"] * 2 * 64 * m["samples_per_s"] / m["clips"])


def test_online_mode_packs_give_the_losses_of_the_cache_packs(cache, tmp_path):
    root = cache.parent
    packing = ["--steps", "3", "data.packing=true", "data.pack_tokens=64", "training.micro_batch_size=1",
               "training.global_batch_size=2"]
    runs = {}
    for name, data in (("cache", ["--data", str(cache)]),
                       ("online", ["--data", str(root / "manifest.jsonl"), "--vae", str(root / "vae"),
                                   "--text-encoder", str(root / "t5")])):
        runs[name] = tmp_path / name
        assert main(["train", *data, "--run-dir", str(runs[name]), *TRAIN_ARGS, *packing]) == 0
    online, cached = losses_of(runs["online"]), losses_of(runs["cache"])
    assert len(online) == 3
    assert max(abs(a - b) / abs(b) for a, b in zip(online, cached)) <= 1e-6, (online, cached)


I2V_ARGS = [*TRAIN_ARGS, "model.in_channels=8", "--steps", "4"]  # the tiny model as an image-to-video model


def test_i2v_from_the_cache_and_online_mode_agree(cache, tmp_path):
    from cogvx_mega.data.cache import read_cache_arrays

    root = cache.parent
    first = cache / "5x32x48" / "first_frame"
    assert first.is_dir()  # the cache stores each clip's first frame beside its moments
    cached = main(["train", "--data", str(cache), "--vae", str(root / "vae"), "--run-dir", str(tmp_path / "c"),
                   *I2V_ARGS])
    online = main(["train", "--data", str(root / "manifest.jsonl"), "--vae", str(root / "vae"), "--text-encoder",
                   str(root / "t5"), "--run-dir", str(tmp_path / "o"), *I2V_ARGS])
    assert cached == online == 0
    a, b = losses_of(tmp_path / "c"), losses_of(tmp_path / "o")
    assert len(a) == 4 and max(abs(x - y) / abs(y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    assert read_cache_arrays(cache)["5x32x48"]["mean"].shape[1] == 4


def test_i2v_needs_the_vae_and_first_frames_of_a_cache(cache, tmp_path, capsys):
    import shutil

    code = main(["train", "--data", str(cache), "--run-dir", str(tmp_path / "a"), *I2V_ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--vae" in err[0], err
    old = tmp_path / "old.zarr"  # a cache written before first frames were stored
    shutil.copytree(cache, old)
    for bucket in ("5x32x48", "1x32x32"):
        shutil.rmtree(old / bucket / "first_frame")
    code = main(["train", "--data", str(old), "--vae", str(cache.parent / "vae"), "--run-dir", str(tmp_path / "b"),
                 *I2V_ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no first frames" in err[0], err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
