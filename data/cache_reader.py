"""Training batches from a latent cache (`cache.py`), read through tensorstore: `cogvx train --data cache.zarr`.

The order is `order.BucketedBatches` over the cache's committed, successfully encoded clips: a pure function of
(seed, step), every global batch from one bucket, data-parallel rank r reading its slots of it. The position
in the data is the global sample index s*G (what a checkpoint records). Each clip's latent is a fresh
posterior sample, mean + std * noise with the noise keyed on (seed, step, global slot), times the VAE's latent
scale: [T', C, H, W] as the transformer takes it.

Reads are asynchronous: the batch of the next step is requested while the current one is returned. A clip's
text embedding is the row `text_row[clip]` of the store's deduplicated `text` array (the text rows are read a
chunk of `cache.TEXT_ROW_CHUNK` clips at a time and the last few chunks kept: memory does not grow with the
clips). The float16 moments and text come back as float32. A "latent-cache-v1" store (float32, text per bucket)
is read too.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.diffusion.randomness import Stream, slot_normal
from cogvx_mega.data.cache import (CACHE_FORMAT, CACHE_FORMAT_V1, FIRST_FRAME, TEXT, TEXT_ROW, TEXT_ROW_CHUNK,
                                   committed, usable_clips)
from cogvx_mega.data.order import BucketedBatches


def posterior_latents(mean: torch.Tensor, logvar: torch.Tensor, slots: range, seed: int, step: int,
                      scaling_factor: float) -> torch.Tensor:
    """Moments [n, C, T', H, W] of the clips in `slots` -> a fresh posterior sample per clip, the noise keyed
    on (seed, step, global slot), times the VAE's latent scale, as [n, T', C, H, W]."""
    noise = slot_normal(mean.shape[1:], slots, seed=seed, step=step, stream=Stream.VAE_POSTERIOR)
    latents = (mean + torch.exp(0.5 * logvar) * noise) * scaling_factor
    return latents.permute(0, 2, 1, 3, 4).contiguous()


class CacheDataset(BucketedBatches):
    """`step_batch(step, slots, global_batch, seed)` -> {"latents" [n, T', C, H, W], "text_embeds" [n, L, D]}."""

    def __init__(self, path: str, text_length: Optional[int] = None, latent_channels: Optional[int] = None,
                 image_latents=None):
        """`image_latents` (a `first_frames.FirstFrameLatents`): image-to-video training; every batch then also
        carries `image_latents` [n, 1, C, h, w] of the clips' stored first frames."""
        import tensorstore as ts
        import zarr

        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise ConfigError("--data", path, "no latent cache there; write one with `cogvx data encode`")
        attrs = zarr.open_group(str(self.path), mode="r").attrs.asdict()
        if attrs.get("format") not in (CACHE_FORMAT, CACHE_FORMAT_V1):
            raise ConfigError("--data", path, f"a zarr store but not a {CACHE_FORMAT} cache")
        self.v1 = attrs["format"] == CACHE_FORMAT_V1
        self.scaling_factor = float(attrs["scaling_factor"])
        markers = committed(self.path)
        planned = attrs.get("shard_count")
        if planned is not None and len(markers) < planned:  # the order would change as more shards land
            raise ConfigError("--data", path, f"is not finished: {len(markers)} of {planned} shards are committed; "
                                              f"run `cogvx data encode` with the same arguments again to finish it")
        super().__init__(usable_clips(self.path, markers))
        self.merged = attrs.get("merged") or {}
        self.encoded_for = {"small_buckets": attrs.get("small_buckets"), "global_batch": attrs.get("global_batch")}
        """data.small_buckets and the global batch the cache was encoded for (None: written before they were
        recorded)."""
        if not any(self.usable.values()):
            failed = [f for marker in markers.values() for f in marker["failed"]]
            why = (f": all {len(failed)} of its clips failed to encode (e.g. {failed[0]['path']}: "
                   f"{failed[0]['reason']})" if failed else "")
            raise ConfigError("--data", path, f"the latent cache holds no clips{why}; nothing to train on")
        if image_latents is not None:
            missing = [b for b in self.usable if not (self.path / b / FIRST_FRAME / "zarr.json").is_file()]
            if missing:
                raise ConfigError("--data", path, f"holds no first frames (bucket {missing[0]}): an image-to-video "
                                                  f"model trains on each clip's first frame; re-encode the cache with "
                                                  f"this version of `cogvx data encode`")
        def open_array(*where: str):
            return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path.joinpath(*where))}},
                           read=True).result()

        self.arrays = {bucket: {name: open_array(bucket, name) for name in self._arrays_read(image_latents)}
                       for bucket in self.usable}
        if self.v1:
            for bucket, arrays in self.arrays.items():
                arrays["text"] = open_array(bucket, "text")
            text_shape = tuple(next(iter(self.arrays.values()))["text"].shape[1:])
        else:
            self.text = open_array(TEXT)
            self.text_rows = {bucket: open_array(bucket, TEXT_ROW) for bucket in self.usable}
            self._row_chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
            text_shape = tuple(self.text.shape[1:])
        self.image_latents = image_latents
        first = next(iter(self.arrays.values()))
        if text_length is not None and text_shape[0] != text_length:
            raise ConfigError("--data", path, f"text embeddings have {text_shape[0]} tokens; the model takes "
                                              f"model.max_text_seq_length={text_length}")
        channels = first["mean"].shape[1]
        if latent_channels is not None and channels != latent_channels:
            raise ConfigError("--data", path, f"latents have {channels} channels; the model's video latents have "
                                              f"model.out_channels={latent_channels}")
        self._pending: dict[tuple, dict] = {}

    @staticmethod
    def _arrays_read(image_latents) -> tuple[str, ...]:
        return ("mean", "logvar", FIRST_FRAME) if image_latents is not None else ("mean", "logvar")

    def _rows_of(self, bucket: str, indices) -> list[int]:
        """The text rows of a bucket's clips, a `TEXT_ROW_CHUNK` chunk of text_row read at a time (the last 64 kept)."""
        rows = []
        for index in indices:
            key = (bucket, int(index) // TEXT_ROW_CHUNK)
            if key not in self._row_chunks:
                start = key[1] * TEXT_ROW_CHUNK
                array = self.text_rows[bucket]
                self._row_chunks[key] = np.asarray(array[start:min(start + TEXT_ROW_CHUNK, array.shape[0])].read()
                                                   .result())
                while len(self._row_chunks) > 64:
                    self._row_chunks.popitem(last=False)
            self._row_chunks.move_to_end(key)
            rows.append(int(self._row_chunks[key][int(index) % TEXT_ROW_CHUNK]))
        return rows

    def _text_reads(self, bucket: str, indices) -> list:
        """Futures of the text embeddings [L, D] of a bucket's clips."""
        if self.v1:
            return [self.arrays[bucket]["text"][index].read() for index in indices]
        return [self.text[row].read() for row in self._rows_of(bucket, indices)]

    @property
    def provides_image_latents(self) -> bool:
        return self.image_latents is not None

    def clip_table(self) -> dict:
        """{(bucket, index): latent grid (T', H', W')} of every usable clip, for packing (`data/packing.py`)."""
        table = {}
        for bucket, indices in self.usable.items():
            _, frames, height, width = self.arrays[bucket]["mean"].shape[1:]
            table.update({(bucket, index): (frames, height, width) for index in indices})
        return table

    def read_clips(self, refs, slots, step: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Latents [T', C, H', W'] (a posterior sample keyed on each clip's slot) and text [L, D] of `refs`."""
        futures = [{"mean": self.arrays[bucket]["mean"][index].read(),
                    "logvar": self.arrays[bucket]["logvar"][index].read(),
                    "text": self._text_reads(bucket, [index])[0]} for bucket, index in refs]
        latents, texts = [], []
        for slot, future in zip(slots, futures):
            values = {name: torch.from_numpy(np.asarray(f.result(), dtype=np.float32))[None]
                      for name, f in future.items()}
            latents.append(posterior_latents(values["mean"], values["logvar"], range(slot, slot + 1), seed, step,
                                             self.scaling_factor)[0])
            texts.append(values["text"][0])
        return latents, texts

    def _request(self, step: int, slots: range, global_batch: int, seed: int) -> dict:
        bucket, clips = self.batch_of_step(step, global_batch, seed)
        mine = clips[slots.start:slots.stop]
        arrays = self.arrays[bucket]
        futures = {name: [arrays[name][index].read() for index in mine] for name in self._arrays_read(
            self.image_latents)}
        futures["text"] = self._text_reads(bucket, mine)
        return {"bucket": bucket, "futures": futures}

    def step_batch(self, step: int, slots: range, global_batch: int, seed: int) -> dict[str, torch.Tensor]:
        key = (step, slots.start, slots.stop, global_batch, seed)
        request = self._pending.pop(key, None) or self._request(step, slots, global_batch, seed)
        following = (step + 1, slots.start, slots.stop, global_batch, seed)
        self._pending = {following: self._request(step + 1, slots, global_batch, seed)}  # prefetch one step
        values = {name: torch.from_numpy(np.stack([f.result() for f in futures]).astype(
                      np.uint8 if name == FIRST_FRAME else np.float32, copy=False))
                  for name, futures in request["futures"].items()}
        latents = posterior_latents(values["mean"], values["logvar"], slots, seed, step, self.scaling_factor)
        batch = {"latents": latents, "text_embeds": values["text"]}
        if self.image_latents is not None:
            batch["image_latents"] = self.image_latents(values[FIRST_FRAME], slots, seed, step)
        return batch
