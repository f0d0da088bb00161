"""What `cogvx train --data` reads, chosen in one place from `data.source`:
'synthetic' (generated moving shapes), a latent cache (`cogvx data encode`, read through tensorstore), a
folder of latents (`cogvx vae encode`), or a manifest (`cogvx data scan`) or its clip index (`data/index.py`) for
online mode, which decodes and encodes the clips on the fly with `data.vae` and `data.text_encoder` (`--vae`,
`--text-encoder`). With data.image_ratio, images are mixed with the videos at that share of the steps
(`image_shards.MixedDataset`): the images of the source's 1-frame buckets, or of the tar shards of data.images.

Opening the data also accounts for it (`data/accounting.py`): a source with no clip, or none that fills a global
batch, is one clear error; a bucket that never fills one is named in a warning (data.small_buckets=drop) or, with
data.small_buckets=merge, its clips go to the nearest bucket that fills one (online mode and synthetic data here;
a latent cache when it is encoded)."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

from typing import Optional

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.accounting import DROP_FIX, first_rank, small_bucket_warning
from cogvx_mega.data.order import check_fills_a_batch
from cogvx_mega.data.latent_dataset import LatentDataset, synthetic_dataset_for
from cogvx_mega.tools.data_encode import check_vae_channels

logger = logging.getLogger(__name__)

ONLINE_SHARD_CLIPS = 0  # online mode plans no encode shards (its clip indices do not depend on them)


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


def open_validation_data(config):
    """The dataset of data.valid (training.valid_every), read like data.source but whole: no packing, no stages,
    no image mix; its first batch of training.valid_samples clips is the validation set."""
    data = dataclasses.replace(config.data, source=config.data.valid, packing=False, stages=None, images=None,
                               image_ratio=None)
    return open_source_data(dataclasses.replace(config, data=data), config.training.valid_samples)


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
    if config.data.image_ratio is not None:
        return open_mixed_data(config, global_batch)
    if source == "synthetic":
        return synthetic_dataset_for(config, global_batch)
    if os.path.isfile(os.path.join(source, "zarr.json")):  # a latent cache written by `cogvx data encode`
        from cogvx_mega.data.cache_reader import CacheDataset

        if config.data.caption_pick == "random":
            raise ConfigError("data.caption_pick", "random", "a latent cache holds one caption's embedding per clip: "
                                                             "train online (a manifest or clip index with --vae and "
                                                             "--text-encoder), or use data.caption_pick=first")
        return CacheDataset(source, config.model.max_text_seq_length, config.model.out_channels,
                            image_latents=cache_image_latents(config))
    if os.path.isfile(source) or is_clip_index(source):
        return open_online_data(config, global_batch)
    if not os.path.isdir(source):
        raise ConfigError("--data", source, "no such file or folder; pass a latent cache (cogvx data encode), a "
                                            "manifest (cogvx data scan) with --vae and --text-encoder, a latent "
                                            "folder (cogvx vae encode) or 'synthetic'")
    return open_latent_folder(config)


def is_clip_index(source: str) -> bool:
    """Whether `source` is a clip index folder (`data/index.py`: a manifest as Parquet parts), which online mode
    reads like the manifest it was built from; an image shard index there is a clear error."""
    from cogvx_mega.data.image_shards import IMAGE_INDEX_FORMAT
    from cogvx_mega.data.index import INDEX_FILE

    meta_file = os.path.join(source, INDEX_FILE)
    if not os.path.isfile(meta_file):
        return False
    try:
        with open(meta_file) as file:
            format_name = json.load(file).get("format")
    except (OSError, ValueError, AttributeError):
        return True  # the index reader says what is wrong with it
    if format_name == IMAGE_INDEX_FORMAT:
        raise ConfigError("--data", source, "is an image shard index (`cogvx data index-images`): pass it as "
                                            "data.images=PATH with data.image_ratio=SHARE, and the videos' manifest "
                                            "as --data")
    return True


def check_online_encoders(data) -> None:
    for flag, value in (("--vae", data.vae), ("--text-encoder", data.text_encoder)):
        if not value:
            raise ConfigError(flag, value, f"online mode (--data {data.source}, a manifest) encodes clips as it "
                                           f"trains and needs {flag} FOLDER; or encode a cache first with "
                                           f"`cogvx data encode` and pass --data cache.zarr")


def plan_online_source(config, global_batch: int, must_hold_clips: bool = True):
    """The plan of the manifest (or clip index) `data.source`, as `cogvx data encode` plans it at the same global
    batch; the lines it leaves out are logged (first rank)."""
    from cogvx_mega.data.cache import plan_from_manifest

    data = config.data
    plan, skipped = plan_from_manifest(data.source, data.bucket_names(), data.fps, ONLINE_SHARD_CLIPS,
                                       data.merge_below(global_batch), data.filters, data.captions)
    if first_rank():
        for line in skipped:
            logger.warning(line)
        if plan.filtered:
            logger.info("%s", plan.filtered["summary"])
    if must_hold_clips and not any(len(clips) for clips in plan.clips.values()):
        raise ConfigError("--data", data.source, f"no clip of the manifest fits a bucket of "
                                                 f"{', '.join(data.bucket_names())}")
    return plan


def open_online_data(config, global_batch: Optional[int] = None):
    """Online mode over the manifest `data.source` (see `cogvx_mega.data.online`), planned as `cogvx data encode`
    plans it at the same global batch."""
    from cogvx_mega.data.online import open_online_dataset
    from cogvx_mega.tools.data_encode import load_encoders

    data = config.data
    check_online_encoders(data)
    plan = plan_online_source(config, global_batch or run_global_batch(config))
    device = config.training.device
    vae, text_encoder = load_encoders(config, data.vae, data.text_encoder, device)
    return open_online_dataset(plan, vae, text_encoder, config, device)


def open_mixed_data(config, global_batch: int):
    """data.image_ratio: image steps and video steps (`image_shards.MixedDataset`), in online mode. The video
    stream is the source's buckets of more than one frame; the image stream the tar shards of data.images, or
    else the source's 1-frame buckets. Both streams share one encoder (one VAE, one T5, one pool of decode
    threads)."""
    from cogvx_mega.data.encoder import ClipEncoder
    from cogvx_mega.data.image_shards import ImageShardIndex, MixedDataset, image_plan, split_plan, stream_step
    from cogvx_mega.data.online import open_online_dataset
    from cogvx_mega.tools.data_encode import load_encoders

    data = config.data
    source, ratio = data.source, data.image_ratio
    if source == "synthetic" or not (os.path.isfile(source) or is_clip_index(source)):
        raise ConfigError("data.image_ratio", ratio, f"mixes images with videos in online mode: pass a manifest "
                                                     f"(cogvx data scan) or its clip index as --data with --vae and "
                                                     f"--text-encoder, not {source!r}; or set data.image_ratio=null")
    check_online_encoders(data)
    plan = plan_online_source(config, global_batch, must_hold_clips=ratio < 1 or data.images is None)
    images_from = ("data.source", source)
    if data.images is not None:
        own = sum(len(clips) for clips in split_plan(plan, images=True).clips.values())
        if own and ratio > 0 and first_rank():
            logger.warning("data.images: the image steps read %s; the %d images of %s in its 1-frame buckets are not "
                           "trained on (leave them out of the manifest, or set data.images=null to train on them)",
                           data.images, own, source)
        image_stream_plan, notes = image_plan(ImageShardIndex.open(data.images), data.bucket_names(),
                                              data.merge_below(global_batch))
        for note in notes if first_rank() else []:
            logger.warning(note)
        images_from = ("data.images", data.images)
    else:
        image_stream_plan = split_plan(plan, images=True)
    device = config.training.device
    vae, text_encoder = load_encoders(config, data.vae, data.text_encoder, device)
    encoder = ClipEncoder(vae, text_encoder, data.fps, device, workers=data.num_workers)
    streams = {}
    for images, stream_plan in ((True, image_stream_plan), (False, split_plan(plan, images=False))):
        share = ratio if images else 1 - ratio
        streams[images] = (open_online_dataset(stream_plan, vae, text_encoder, config, device, encoder=encoder,
                                               order_step=functools.partial(stream_step, image_ratio=ratio,
                                                                            images=images))
                           if share > 0 else None)
    try:
        return MixedDataset(streams[True], streams[False], ratio, global_batch, images_from=images_from,
                            videos_from=("data.source", source))
    except ConfigError:
        encoder.close()
        raise


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
