"""What `cogvx train --data` reads, chosen in one place from `data.source`:
'synthetic' (generated moving shapes), a latent cache (`cogvx data encode`, read through tensorstore), a
folder of latents (`cogvx vae encode`), or a manifest (`cogvx data scan`) for online mode, which decodes
and encodes the clips on the fly with `data.vae` and `data.text_encoder` (`--vae`, `--text-encoder`).

Opening the data also accounts for it (`data/accounting.py`): a source with no clip, or none that fills a global
batch, is one clear error; a bucket that never fills one is named in a warning (data.small_buckets=drop) or, with
data.small_buckets=merge, its clips go to the nearest bucket that fills one (online mode and synthetic data here;
a latent cache when it is encoded)."""
from __future__ import annotations

import dataclasses
import logging
import os

from typing import Optional

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.accounting import DROP_FIX, first_rank, small_bucket_warning
from cogvx_mega.data.order import check_fills_a_batch
from cogvx_mega.data.latent_dataset import LatentDataset, synthetic_dataset_for
from cogvx_mega.tools.data_encode import check_vae_channels

logger = logging.getLogger(__name__)

ONLINE_SHARD_CLIPS = 16  # planning only: online mode's clip indices do not depend on it


def run_global_batch(config) -> int:
    """The run's global batch (clips per step; packs with data.packing): training.global_batch_size, else
    micro_batch_size x the data-parallel size of the process group (1 without one)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    return config.training.global_batch(config.parallel.data_parallel_size(world))


def open_training_data(config, global_batch: Optional[int] = None):
    """A dataset with `step_batch(step, slots, global_batch, seed)` for the trainer: the source of
    `data.source`, packed with data.packing, switched at each of `data.stages`. `global_batch`: the run's
    (`Config.check_world`); default `run_global_batch(config)`."""
    global_batch = global_batch or run_global_batch(config)
    stages = config.data.stage_configs()
    if len(stages) == 1:
        return open_stage_data(config, global_batch)
    from cogvx_mega.data.stages import StagedDataset

    return StagedDataset([(start, end, (lambda data=data: open_stage_data(dataclasses.replace(config, data=data),
                                                                          global_batch)))
                          for start, end, data in stages])


def open_stage_data(config, global_batch: Optional[int] = None):
    """One stage's dataset: the source, packed when data.packing is on; its buckets accounted for
    (`account_buckets`)."""
    from cogvx_mega.data.packing import packed_dataset_for

    global_batch = global_batch or run_global_batch(config)
    dataset = open_source_data(config, global_batch)
    if not config.data.packing:
        account_buckets(dataset, config, global_batch)
    m = config.model
    if m.is_image_to_video and not getattr(dataset, "provides_image_latents", False):
        raise ConfigError("--data", config.data.source, "gives no first frames, and an image-to-video model trains on "
                                                        "the first frame's latent: use --data synthetic, a latent "
                                                        "cache (cogvx data encode) with --vae, or a manifest (online "
                                                        "mode)")
    return packed_dataset_for(dataset, config) or dataset


def account_buckets(dataset, config, global_batch: int) -> None:
    """Without packing: a clear error when no bucket of `dataset` fills a global batch; one warning line (on
    the first rank) naming each bucket that never does, with what to do about it."""
    if getattr(dataset, "streams_epochs", False):  # one stream of epochs: every clip is drawn
        return
    clips = dataset.bucket_clips()
    check_fills_a_batch(clips, global_batch)
    policy = config.data.small_buckets
    fix = DROP_FIX
    encoded_for = getattr(dataset, "encoded_for", None)
    if policy == "merge" and encoded_for == {"small_buckets": "merge", "global_batch": global_batch}:
        fix = ("the cache was encoded merging small buckets at this global batch, so these are short of clips that "
               "failed to encode or that no bucket filling a global batch has the frames for (see `cogvx data "
               "info`); use data.packing, or lower training.global_batch_size")
    elif policy == "merge" and encoded_for is not None:  # a latent cache: it merged, or not, when it was encoded
        fix = (f"a latent cache merges small buckets when it is encoded, and this one was encoded with "
               f"data.small_buckets={encoded_for['small_buckets']} for a global batch of "
               f"{encoded_for['global_batch']}: re-encode it with data.small_buckets=merge "
               f"training.global_batch_size={global_batch}, or use data.packing")
    elif policy == "merge":
        fix = ("no bucket that fills a global batch has the frames for them (a clip is merged only into a bucket "
               "it can fill); add such a bucket to data.buckets, use data.packing, or lower "
               "training.global_batch_size")
    warning = small_bucket_warning(clips, global_batch, policy, fix)
    if warning and first_rank():
        logger.warning(warning)


def open_source_data(config, global_batch: Optional[int] = None):
    source = config.data.source
    global_batch = global_batch or run_global_batch(config)
    if source == "synthetic":
        return synthetic_dataset_for(config, global_batch)
    if os.path.isfile(os.path.join(source, "zarr.json")):  # a latent cache written by `cogvx data encode`
        from cogvx_mega.data.cache_reader import CacheDataset

        return CacheDataset(source, config.model.max_text_seq_length, config.model.out_channels,
                            image_latents=cache_image_latents(config))
    if os.path.isfile(source):
        return open_online_data(config, global_batch)
    if not os.path.isdir(source):
        raise ConfigError("--data", source, "no such file or folder; pass a latent cache (cogvx data encode), a "
                                            "manifest (cogvx data scan) with --vae and --text-encoder, a latent "
                                            "folder (cogvx vae encode) or 'synthetic'")
    return open_latent_folder(config)


def open_online_data(config, global_batch: Optional[int] = None):
    """Online mode over the manifest `data.source` (see `cogvx_mega.data.online`), planned as `cogvx data encode`
    plans it at the same global batch."""
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
    plan, skipped = plan_from_manifest(data.source, data.bucket_names(), data.fps, ONLINE_SHARD_CLIPS,
                                       data.merge_below(global_batch or run_global_batch(config)))
    if not dist.is_initialized() or dist.get_rank() == 0:
        for line in skipped:
            logger.warning(line)
    if not plan.shards:
        raise ConfigError("--data", data.source, f"no clip of the manifest fits a bucket of "
                                                 f"{', '.join(data.bucket_names())}")
    device = config.training.device
    vae, text_encoder = load_encoders(config, data.vae, data.text_encoder, device)
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
    check_vae_channels(vae, config, "--vae", data.vae)
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
