"""Cached training inputs (latents already scaled, text embeddings) and the deterministic sampler.

On disk, a latent folder holds `latents.safetensors` (tensors `latents` [N, T, C, H, W] and
`text_embeds` [N, L, D]), `captions.jsonl` and `meta.json`. The sampler maps (seed, global sample
position) to a sample index: global sample slot j of step s is position s*G + j of a stream of epochs,
each a fresh permutation. Resuming needs only the step (and the unchanged global batch G), and any
data-parallel split of the slots sees exactly the samples one process would.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

LATENTS_FILE = "latents.safetensors"
META_FILE = "meta.json"
CAPTIONS_FILE = "captions.jsonl"
SINGLE_BUCKET = "all"  # the bucket name of a dataset whose clips all have one size


class LatentDataset:
    streams_epochs = True
    """Its batches come from one stream of epochs (`global_sample_indices`): no clip is ever left out."""

    def __init__(self, latents: Tensor, text_embeds: Tensor, captions: Optional[list[str]] = None,
                 first_frames: Optional[Tensor] = None, image_latents=None):
        """`first_frames` [N, 3, H, W] uint8 and `image_latents` (a `first_frames.FirstFrameLatents`): the
        image-to-video inputs; every batch then carries `image_latents` [n, 1, C, h, w]."""
        if latents.shape[0] != text_embeds.shape[0]:
            raise ValueError(f"{latents.shape[0]} latent clips but {text_embeds.shape[0]} text embeddings")
        self.latents = latents
        self.text_embeds = text_embeds
        self.captions = captions or [""] * latents.shape[0]
        self.first_frames = first_frames
        self.image_latents = image_latents

    @property
    def provides_image_latents(self) -> bool:
        return self.image_latents is not None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def bucket_clips(self) -> dict[str, int]:
        """bucket -> clips: one bucket of every clip."""
        return {SINGLE_BUCKET: len(self)}

    @classmethod
    def load(cls, folder: str) -> "LatentDataset":
        from safetensors.torch import load_file

        path = Path(folder)
        if not (path / LATENTS_FILE).is_file():
            raise FileNotFoundError(f"--data {folder}: no {LATENTS_FILE} there; pass a latent folder written by "
                                    f"`cogvx demo` / `write_latent_folder`, or --data synthetic")
        tensors = load_file(str(path / LATENTS_FILE))
        captions_path = path / CAPTIONS_FILE
        captions = ([json.loads(line)["caption"] for line in captions_path.read_text().splitlines()]
                    if captions_path.is_file() else None)
        return cls(tensors["latents"], tensors["text_embeds"], captions)

    def clip_table(self) -> dict:
        """{(bucket, index): latent grid (T', H', W')} of every clip, for packing (`data/packing.py`)."""
        t, _, h, w = self.latents.shape[1:]
        return {(SINGLE_BUCKET, index): (t, h, w) for index in range(len(self))}

    def read_clips(self, refs, slots, step: int, seed: int) -> tuple[list[Tensor], list[Tensor]]:
        """Latents [T', C, H', W'] and text [L, D] of the clips `refs` (slots unused: nothing is sampled)."""
        return [self.latents[index] for _, index in refs], [self.text_embeds[index] for _, index in refs]

    def step_batch(self, step: int, slots: range, global_batch: int, seed: int) -> dict[str, Tensor]:
        """The samples of global slots `slots` of step `step` (what a data-parallel rank trains on)."""
        mine = global_sample_indices(step, global_batch, len(self), seed)[slots.start:slots.stop]
        batch = {"latents": self.latents[mine], "text_embeds": self.text_embeds[mine]}
        if self.image_latents is not None:
            batch["image_latents"] = self.image_latents(self.first_frames[mine], slots, seed, step)
        return batch

    def save(self, folder: str) -> Path:
        from safetensors.torch import save_file

        from cogvx_mega.checkpoint.atomic import atomic_directory

        with atomic_directory(folder) as tmp:
            save_file({"latents": self.latents.contiguous(), "text_embeds": self.text_embeds.contiguous()},
                      str(tmp / LATENTS_FILE))
            (tmp / CAPTIONS_FILE).write_text("".join(json.dumps({"caption": c}) + "\n" for c in self.captions))
            (tmp / META_FILE).write_text(json.dumps({"clips": len(self), "latent_shape": list(self.latents.shape[1:]),
                                                     "text_shape": list(self.text_embeds.shape[1:])}))
        return Path(folder)


def global_sample_indices(step: int, global_batch: int, num_samples: int, seed: int) -> Tensor:
    """Indices of the global batch of `step`: a fresh permutation per epoch, a pure function of its inputs."""
    positions = torch.arange(step * global_batch, (step + 1) * global_batch)
    epochs = positions // num_samples
    out = torch.empty(global_batch, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        permutation = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        chosen = epochs == epoch
        out[chosen] = permutation[positions[chosen] % num_samples]
    return out


def rank_slots(samples_per_rank: int, data_parallel_rank: int) -> range:
    """The global sample slots of a data-parallel rank: a contiguous block of the step's global batch."""
    return range(data_parallel_rank * samples_per_rank, (data_parallel_rank + 1) * samples_per_rank)


def rank_batch(dataset: LatentDataset, step: int, samples_per_rank: int, data_parallel_rank: int,
               data_parallel_size: int, seed: int) -> dict[str, Tensor]:
    """This rank's slice of the global batch of `step` (rank r holds slots r*n .. (r+1)*n-1)."""
    return dataset.step_batch(step, rank_slots(samples_per_rank, data_parallel_rank),
                              samples_per_rank * data_parallel_size, seed)


class BucketedLatentDataset:
    """Clips of several sizes held in memory, one tensor per bucket: {bucket: (latents [n, T', C, H', W'],
    text_embeds [n, L, D])}. Batches come from one bucket at a time in the cache reader's order
    (`order.BucketedBatches`); with data.packing the clips of all buckets are packed together."""

    def __init__(self, buckets: dict, merged: Optional[dict] = None):
        """`merged`: {small bucket: {bucket: clips moved there}} of data.small_buckets=merge."""
        from cogvx_mega.data.order import BucketedBatches

        self.buckets = buckets
        self.batches = BucketedBatches({name: list(range(latents.shape[0])) for name, (latents, _) in buckets.items()})
        self.merged = merged or {}

    def __len__(self) -> int:
        return len(self.batches)

    def bucket_clips(self) -> dict[str, int]:
        return self.batches.bucket_clips()

    def clip_table(self) -> dict:
        table = {}
        for name, (latents, _) in self.buckets.items():
            t, _, h, w = latents.shape[1:]
            table.update({(name, index): (t, h, w) for index in range(latents.shape[0])})
        return table

    def read_clips(self, refs, slots, step: int, seed: int) -> tuple[list[Tensor], list[Tensor]]:
        return ([self.buckets[name][0][index] for name, index in refs],
                [self.buckets[name][1][index] for name, index in refs])

    def step_batch(self, step: int, slots: range, global_batch: int, seed: int) -> dict[str, Tensor]:
        bucket, clips = self.batches.batch_of_step(step, global_batch, seed)
        mine = clips[slots.start:slots.stop]
        latents, texts = self.buckets[bucket]
        return {"latents": latents[mine], "text_embeds": texts[mine]}


def synthetic_dataset_for(config, global_batch: Optional[int] = None):
    """The synthetic moving-shapes dataset at the config's resolution and model widths; with data.buckets, the
    clips are spread over the buckets in turn (a `BucketedLatentDataset`). An image-to-video model gets the
    clips' first frames too, encoded by the toy encoder (`first_frames.ToyFirstFrameLatents`).

    With data.small_buckets=merge, the clips of a bucket that holds fewer than `global_batch` (default:
    training.global_batch_size, or micro_batch_size) are rendered at the size of the nearest bucket that fills
    one (`buckets.merge_small_buckets`, each clip standing for a source of its own bucket's size) and join it:
    the synthetic counterpart of encoding them at that size."""
    from cogvx_mega.config.errors import ConfigError
    from cogvx_mega.data.synthetic import generate_synthetic_clips, generate_synthetic_dataset

    data, model = config.data, config.model
    channels = model.out_channels  # the video latents; an image-to-video model takes twice as many channels in
    image_to_video = model.is_image_to_video
    if data.buckets:
        from cogvx_mega.data.buckets import Bucket

        if image_to_video:
            raise ConfigError("data.buckets", data.buckets, "the synthetic data has no first frames per bucket for "
                                                            "an image-to-video model: use one resolution "
                                                            "(data.buckets=null), or a latent cache")
        from cogvx_mega.data.buckets import merge_small_buckets

        names = data.bucket_names()
        grouped = {}  # bucket -> a stand-in record per clip: the bucket's own size, the number of its seed
        for number, name in enumerate(names):
            bucket = Bucket.parse(name)
            grouped[bucket] = [{"kind": "video" if bucket.frames > 1 else "image", "frames": bucket.frames,
                                "fps": data.fps, "height": bucket.height, "width": bucket.width, "number": number}
                               for _ in range(number, data.num_synthetic_clips, len(names))]
        merged = {}
        merge_below = data.merge_below(global_batch or config.training.global_batch(1))
        if merge_below:
            grouped, merged = merge_small_buckets(grouped, data.fps, merge_below)
        buckets = {}
        for bucket, records in grouped.items():
            parts = []
            for number in dict.fromkeys(record["number"] for record in records):  # its own clips first
                count = sum(record["number"] == number for record in records)
                parts.append(generate_synthetic_dataset(
                    count, bucket.frames, bucket.height, bucket.width, channels, model.text_embed_dim,
                    model.max_text_seq_length, seed=config.training.seed * 101 + number)[:2])
            if parts:
                buckets[bucket.name] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        return BucketedLatentDataset(buckets, merged)
    clips = generate_synthetic_clips(data.num_synthetic_clips, data.num_frames, data.height, data.width, channels,
                                     model.text_embed_dim, model.max_text_seq_length, seed=config.training.seed)
    if not image_to_video:
        return LatentDataset(clips.latents, clips.text_embeds, clips.captions)
    from cogvx_mega.data.first_frames import ToyFirstFrameLatents

    return LatentDataset(clips.latents, clips.text_embeds, clips.captions, first_frames=clips.first_frames,
                         image_latents=ToyFirstFrameLatents(clips.image_encoder, config.diffusion))
