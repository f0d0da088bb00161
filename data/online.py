"""Online mode for small runs: `cogvx train --data manifest.jsonl --vae VAE --text-encoder T5` decodes and
encodes clips on the fly instead of reading a latent cache.

It plans the manifest exactly as `cogvx data encode` does (`plan_from_manifest`: the same buckets and clip
indices), draws the same global batch at every step (`BucketedBatches`), encodes each clip with the same
encoder (`ClipEncoder`) and draws the posterior sample with the same noise (`posterior_latents`), so it
yields the batches the cache of that manifest would. The one difference is a clip that fails to decode:
the cache knows before training and leaves it out of the shuffle, online mode learns it at the step that
draws it, skips it (logged with its path and reason, counted in `skipped`) and puts the next clip of the
same bucket that decodes in its place, so the step still has its full batch and the run goes on.

The clips of the next step are decoded in the background (`data.num_workers` threads) while the current
step trains; encoded clips are kept in memory (`data.online_keep_clips`, least recently used dropped) so
later epochs skip the decode and the VAE.

Images mixed with videos at data.image_ratio (`image_shards.MixedDataset`) are two of these datasets, one per
stream, sharing one encoder: each reads the order of its own stream (`order_step`), and the posterior noise of
a step stays keyed on the training step, which belongs to one stream only, so the streams never share a key.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np
import torch

from cogvx_mega.data.buckets import Bucket
from cogvx_mega.data.cache import CachePlan, moments_problem, stored
from cogvx_mega.data.cache_reader import posterior_latents
from cogvx_mega.data.captioning import pick_caption
from cogvx_mega.data.decode import media_name
from cogvx_mega.data.order import BucketedBatches, ClipRange
from cogvx_mega.data.encoder import ClipEncoder, cancel
from cogvx_mega.diffusion.randomness import Stream, slot_uniform

logger = logging.getLogger(__name__)


class OnlineDataset(BucketedBatches):
    """`step_batch(step, slots, global_batch, seed)` -> {"latents" [n, T', C, H, W], "text_embeds" [n, L, D]},
    encoding the clips of `plan` with `encoder` as they are needed."""

    def __init__(self, plan: CachePlan, encoder: ClipEncoder, scaling_factor: float, keep_clips: int = 256,
                 compression: tuple[int, int] = (4, 8), image_latents=None,
                 order_step: Optional[Callable[[int], int]] = None):
        """`compression`: the VAE's (temporal, spatial) factors, which give each bucket's latent grid.
        `image_latents` (a `first_frames.FirstFrameLatents`): image-to-video training; every batch then also
        carries `image_latents` [n, 1, C, h, w] of the clips' first frames. `order_step`: the step of the data
        order that training step s reads (None: s itself); a stream of a mix reads its own stream's steps
        (`image_shards.stream_step`), while the posterior noise stays keyed on s."""
        self.captions: list[str] = ["caption"]
        """data.captions; with `caption_pick` 'random' each use of a clip draws one of those it holds."""
        self.caption_pick = "first"
        self._texts: OrderedDict[str, np.ndarray] = OrderedDict()  # caption -> embedding, least recent first
        self.image_latents = image_latents
        self.order_step = order_step
        super().__init__({bucket: ClipRange(len(items)) for bucket, items in plan.clips.items() if len(items)})
        self.plan, self.encoder, self.scaling_factor, self.keep_clips = plan, encoder, scaling_factor, keep_clips
        self.merged = plan.merged
        self.compression = compression
        self.skipped: dict[tuple[str, int], str] = {}
        """(bucket, index) -> why the clip could not be used."""
        self._kept: OrderedDict[tuple[str, int], tuple[np.ndarray, ...]] = OrderedDict()
        self._decoding: dict[tuple[str, int], object] = {}
        self._reported: set[tuple[str, int]] = set()

    def batch_of_step(self, step: int, global_batch: int, seed: int) -> tuple[str, list[int]]:
        order_step = step if self.order_step is None else self.order_step(step)
        return super().batch_of_step(order_step, global_batch, seed)

    def _record(self, clip: tuple[str, int]) -> dict:
        return self.plan.clips[clip[0]][clip[1]]

    def _start_decoding(self, clips: list[tuple[str, int]]) -> None:
        wanted = [c for c in dict.fromkeys(clips) if c not in self._kept and c not in self._decoding
                  and c not in self.skipped]
        for bucket in dict.fromkeys(c[0] for c in wanted):
            group = [c for c in wanted if c[0] == bucket]
            futures = self.encoder.decode_ahead([self._record(c) for c in group], Bucket.parse(bucket))
            self._decoding.update(zip(group, futures))

    def _encode(self, clips: list[tuple[str, int]]) -> None:
        """Encode the clips not kept yet (one bucket), keeping the results or recording the failures."""
        todo = [c for c in dict.fromkeys(clips) if c not in self._kept and c not in self.skipped]
        if not todo:
            return
        self._start_decoding(todo)
        records = [self._record(c) for c in todo]
        encoded = self.encoder.encode(records, Bucket.parse(todo[0][0]), [self._decoding.pop(c) for c in todo])
        for offset, clip in enumerate(todo):
            pair = encoded.moments[offset]
            reason = encoded.failures[offset] if pair is None else moments_problem(pair)
            if reason is not None:  # as the cache: a clip that does not decode, or float16 cannot hold
                self.skipped[clip] = reason
                continue
            # the cache's float16 round trip, so both train on the same numbers
            self._kept[clip] = (stored(pair[0]), stored(pair[1]), stored(encoded.text[offset]),
                                encoded.first_frames[offset])

    def _clip_or_replacement(self, clip: tuple[str, int]) -> tuple[str, int]:
        """The clip, or when it does not decode, the next one of its bucket (in index order, wrapping) that does."""
        bucket, index = clip
        count = len(self.plan.clips[bucket])
        for offset in range(count):
            candidate = (bucket, (index + offset) % count)
            self._encode([candidate])
            if candidate not in self.skipped:
                if offset and clip not in self._reported:
                    self._reported.add(clip)
                    logger.warning("skipped %s: %s; %s takes its place in this batch",
                                   media_name(self._record(clip)), self.skipped[clip],
                                   media_name(self._record(candidate)))
                return candidate
        raise RuntimeError(f"no clip of bucket {bucket} could be decoded ({count} tried, e.g. "
                           f"{media_name(self._record(clip))}: {self.skipped[clip]}); check the manifest's files")

    def _use(self, chosen: list[tuple[str, int]]) -> list:
        values = [self._kept[clip] for clip in chosen]
        for clip in chosen:
            self._kept.move_to_end(clip)
        while len(self._kept) > self.keep_clips:
            self._kept.popitem(last=False)
        return values

    # --- packing (data/packing.py) ---------------------------------------------------------------------------
    def clip_table(self) -> dict:
        """{(bucket, index): latent grid (T', H', W')} of every planned clip, for packing. A clip that fails to
        decode is replaced by one of its bucket, so a pack keeps its token count."""
        temporal, spatial = self.compression
        table = {}
        for bucket, indices in self.usable.items():
            b = Bucket.parse(bucket)
            grid = ((b.frames - 1) // temporal + 1, b.height // spatial, b.width // spatial)
            table.update({(bucket, index): grid for index in indices})
        return table

    def prefetch(self, refs) -> None:
        """Start decoding the clips of the next step in the background (and drop decodes nobody will use)."""
        wanted = set(refs)
        cancel([self._decoding.pop(c) for c in [c for c in self._decoding if c not in wanted]])
        self._start_decoding(list(refs))

    def read_clips(self, refs, slots, step: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Latents [T', C, H', W'] (a posterior sample keyed on each clip's slot) and text [L, D] of `refs`."""
        for bucket in dict.fromkeys(ref[0] for ref in refs):
            self._encode([ref for ref in refs if ref[0] == bucket])
        chosen = [self._clip_or_replacement(ref) for ref in refs]
        values = self._picked_texts(self._use(chosen), chosen, slots, seed, step)
        latents, texts = [], []
        for slot, (mean, logvar, text, _) in zip(slots, values):
            latents.append(posterior_latents(torch.from_numpy(mean)[None], torch.from_numpy(logvar)[None],
                                             range(slot, slot + 1), seed, step, self.scaling_factor)[0])
            texts.append(torch.from_numpy(text))
        return latents, texts

    def step_batch(self, step: int, slots: range, global_batch: int, seed: int) -> dict[str, torch.Tensor]:
        bucket, clips = self.batch_of_step(step, global_batch, seed)
        mine = [(bucket, index) for index in clips[slots.start:slots.stop]]
        following, next_clips = self.batch_of_step(step + 1, global_batch, seed)
        upcoming = [(following, index) for index in next_clips[slots.start:slots.stop]]
        stale = [c for c in self._decoding if c not in mine and c not in upcoming]  # e.g. a resume jumped ahead
        cancel([self._decoding.pop(c) for c in stale])
        self._encode(mine)
        self._start_decoding(upcoming)  # decoded in the background while this step trains
        chosen = [self._clip_or_replacement(clip) for clip in mine]
        values = self._picked_texts(self._use(chosen), chosen, slots, seed, step)
        mean, logvar, text, first = (torch.from_numpy(np.stack(parts)) for parts in zip(*values))
        latents = posterior_latents(mean, logvar, slots, seed, step, self.scaling_factor)
        batch = {"latents": latents, "text_embeds": text}
        if self.image_latents is not None:
            batch["image_latents"] = self.image_latents(first, slots, seed, step)
        if self.plan.filtered:  # data.filters: what the stage draws from, in the run's metrics
            batch["data_filters"] = {"kept": self.plan.filtered["kept"], "dropped": self.plan.filtered["dropped"]}
        return batch

    def _picked_texts(self, values: list, clips: list, slots, seed: int, step: int) -> list:
        """data.caption_pick=random: each clip's text embedding for the caption drawn for its slot of this step
        (`captioning.pick_caption` with a draw keyed on (seed, step, slot)); the kept embedding where the draw gives
        the caption the clip was encoded with (the first of data.captions it holds), others encoded once and kept."""
        if self.caption_pick != "random" or len(self.captions) < 2:
            return values
        draws = slot_uniform(list(slots), seed=seed, step=step, stream=Stream.CAPTION_PICK).tolist()
        out = []
        for value, clip, draw in zip(values, clips, draws):
            record = self._record(clip)
            # the index's caption column holds the first choice; the manifest's own caption is kept beside it
            columns = {**record, "caption": record.get("manifest_caption", record["caption"])}
            caption = pick_caption(columns, self.captions, "random", draw)
            if caption != record["caption"]:
                if caption not in self._texts:
                    self._texts[caption] = stored(self.encoder.encode_text([caption])[0])
                    while len(self._texts) > max(self.keep_clips, 64):
                        self._texts.popitem(last=False)
                self._texts.move_to_end(caption)
                value = (value[0], value[1], self._texts[caption], value[3])
            out.append(value)
        return out

    @property
    def provides_image_latents(self) -> bool:
        return self.image_latents is not None

    def close(self) -> None:
        cancel(list(self._decoding.values()))
        self._decoding.clear()
        self.encoder.close()


def open_online_dataset(plan: CachePlan, vae, text_encoder, config, device: Optional[str] = None,
                        encoder: Optional[ClipEncoder] = None,
                        order_step: Optional[Callable[[int], int]] = None) -> OnlineDataset:
    """Online mode over `plan` with a loaded VAE and T5 (see `cogvx_mega.tools.training_data`); an image-to-video
    model's first frames are encoded with the same VAE. `encoder`: one shared with another stream of a mix (else
    one is made); `order_step`: see `OnlineDataset`."""
    device = device or config.training.device
    encoder = encoder or ClipEncoder(vae, text_encoder, config.data.fps, device, workers=config.data.num_workers)
    image_latents = None
    if config.model.is_image_to_video:
        from cogvx_mega.data.first_frames import VAEFirstFrameLatents

        image_latents = VAEFirstFrameLatents(vae, config.diffusion, device)
    dataset = OnlineDataset(plan, encoder, float(vae.config.scaling_factor), keep_clips=config.data.online_keep_clips,
                            compression=(config.model.temporal_compression_ratio,
                                         config.data.spatial_compression_ratio),
                            image_latents=image_latents, order_step=order_step)
    dataset.captions = list(config.data.captions or ["caption"])
    dataset.caption_pick = config.data.caption_pick
    return dataset
