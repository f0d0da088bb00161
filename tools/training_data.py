"""What `cogvx train --data` reads, chosen in one place from `data.source`:
'synthetic' (generated moving shapes), a latent cache (`cogvx data encode`, read through tensorstore), a
folder of latents (`cogvx vae encode`), or a manifest (`cogvx data scan`) for online mode, which decodes
and encodes the clips on the fly with `data.vae` and `data.text_encoder` (`--vae`, `--text-encoder`)."""
from __future__ import annotations

import dataclasses
import logging
import os

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.latent_dataset import LatentDataset, synthetic_dataset_for

logger = logging.getLogger(__name__)

ONLINE_SHARD_CLIPS = 16  # planning only: online mode's clip indices do not depend on it


def open_training_data(config):
    """A dataset with `step_batch(step, slots, global_batch, seed)` for the trainer: the source of
    `data.source`, packed with data.packing, switched at each of `data.stages`."""
    stages = config.data.stage_configs()
    if len(stages) == 1:
        return open_stage_data(config)
    from cogvx_mega.data.stages import StagedDataset

    return StagedDataset([(start, end, (lambda data=data: open_stage_data(dataclasses.replace(config, data=data))))
                          for start, end, data in stages])


def open_stage_data(config):
    """One stage's dataset: the source, packed when data.packing is on."""
    from cogvx_mega.data.packing import packed_dataset_for

    dataset = open_source_data(config)
    m = config.model
    if m.is_image_to_video and not getattr(dataset, "provides_image_latents", False):
        raise ConfigError("--data", config.data.source, "gives no first frames, and an image-to-video model trains on "
                                                        "the first frame's latent: use --data synthetic, a latent "
                                                        "cache (cogvx data encode) with --vae, or a manifest (online "
                                                        "mode)")
    return packed_dataset_for(dataset, config) or dataset


def open_source_data(config):
    source = config.data.source
    if source == "synthetic":
        return synthetic_dataset_for(config)
    if os.path.isfile(os.path.join(source, "zarr.json")):  # a latent cache written by `cogvx data encode`
        from cogvx_mega.data.cache_reader import CacheDataset

        return CacheDataset(source, config.model.max_text_seq_length, config.model.out_channels,
                            image_latents=cache_image_latents(config))
    if os.path.isfile(source):
        return open_online_data(config)
    if not os.path.isdir(source):
        raise ConfigError("--data", source, "no such file or folder; pass a latent cache (cogvx data encode), a "
                                            "manifest (cogvx data scan) with --vae and --text-encoder, a latent "
                                            "folder (cogvx vae encode) or 'synthetic'")
    return open_latent_folder(config)


def open_online_data(config):
    """Online mode over the manifest `data.source` (see `cogvx_mega.data.online`)."""
    import torch.distributed as dist

    from cogvx_mega.data.cache import plan_from_manifest
    from cogvx_mega.data.online import open_online_dataset
    from cogvx_mega.tools.data_encode import load_encoders

    data = config.data
    for flag, value in (("--vae", data.vae), ("--text-encoder", data.text_encoder)):
        if not value:
            raise ConfigError(flag, value, f"online mode (--data {data.source}, a manifest) encodes clips as it "
                                           f"trains and needs {flag} FOLDER; or encode a cache first with "
                                           f"`cogvx data encode` and pass --data cache.zarr")
    plan, skipped = plan_from_manifest(data.source, data.bucket_names(), data.fps, ONLINE_SHARD_CLIPS)
    if not dist.is_initialized() or dist.get_rank() == 0:
        for line in skipped:
            logger.warning(line)
    if not plan.shards:
        raise ConfigError("--data", data.source, f"no clip of the manifest fits a bucket of "
                                                 f"{', '.join(data.bucket_names())}")
    device = config.training.device
    vae, text_encoder = load_encoders(config, data.vae, data.text_encoder, device)
    if vae.config.latent_channels != config.model.out_channels:
        raise ConfigError("--vae", data.vae, f"makes {vae.config.latent_channels}-channel latents; the model's video "
                                             f"latents have model.out_channels={config.model.out_channels}")
    return open_online_dataset(plan, vae, text_encoder, config, device)


def cache_image_latents(config):
    """Image-to-video training on a latent cache: the encoder of the stored first frames (the VAE of data.vae);
    None for a text-to-video model."""
    m, data = config.model, config.data
    if not m.is_image_to_video:
        return None
    if not data.vae:
        raise ConfigError("--vae", None, f"an image-to-video model encodes each clip's first frame at every step: pass "
                                         f"--vae FOLDER (the VAE that encoded {data.source})")
    from cogvx_mega.data.first_frames import VAEFirstFrameLatents
    from cogvx_mega.tools.load import load_vae

    vae = load_vae(data.vae, device=config.training.device)
    if vae.config.latent_channels != m.out_channels:
        raise ConfigError("--vae", data.vae, f"makes {vae.config.latent_channels}-channel latents; the model's video "
                                             f"latents have model.out_channels={m.out_channels}")
    return VAEFirstFrameLatents(vae, config.diffusion, config.training.device)


def open_latent_folder(config) -> LatentDataset:
    source = config.data.source
    dataset = LatentDataset.load(source)
    expected = (config.data.latent_shape(config.model), config.model.out_channels)
    t, c, h, w = dataset.latents.shape[1:]
    if ((t, h, w), c) != expected:
        raise ConfigError("--data", source, f"latents are [T={t}, C={c}, H={h}, W={w}] but the config expects "
                         f"[T={expected[0][0]}, C={expected[1]}, H={expected[0][1]}, W={expected[0][2]}]; "
                         f"set data.num_frames/height/width to match")
    text_length, text_width = dataset.text_embeds.shape[1:]
    m = config.model
    if (text_length, text_width) != (m.max_text_seq_length, m.text_embed_dim):
        raise ConfigError("--data", source, f"text embeddings are [L={text_length}, D={text_width}] but the model "
                         f"takes [L=model.max_text_seq_length={m.max_text_seq_length}, D=model.text_embed_dim="
                         f"{m.text_embed_dim}]; re-encode the captions at that length or set the model fields")
    return dataset
