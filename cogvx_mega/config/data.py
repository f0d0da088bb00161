"""The data section: where training clips come from, their resolution buckets, packing and progressive stages."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from cogvx_mega.config.errors import ConfigError, check_choices, check_frame_count
from cogvx_mega.config.model import ModelConfig

STAGE_FIELDS = {"buckets", "source", "pack_tokens", "num_frames", "height", "width", "images", "image_ratio",
                "filters", "captions", "caption_pick"}
CaptionPick = Literal["first", "random"]
FILTER_KEYS = {"column", "min", "max"}
SmallBuckets = Literal["drop", "merge"]


@dataclass
class DataConfig:
    """Training clips. Sizes are in pixels; the latent grid follows from the VAE compression (4x time, 8x space)."""

    source: str = "synthetic"
    """'synthetic' (generated moving shapes), a latent cache (`cogvx data encode`), a folder of latents from
    `cogvx vae encode`, or a manifest (.jsonl from `cogvx data scan`, or its clip index folder from `cogvx data
    index`) for online mode: clips decoded and encoded on the fly with `vae` and `text_encoder`, the same batches
    the cache of that manifest gives."""
    num_frames: int = 49
    height: int = 480
    width: int = 720
    spatial_compression_ratio: int = 8
    num_synthetic_clips: int = 64
    num_workers: int = 4
    """Background threads decoding clips ahead of use (`cogvx data encode`, online mode); 0: decode in the
    calling thread."""
    vae: Optional[str] = None
    """Online mode: the VAE folder (diffusers or cogvx-mega) that encodes the clips."""
    text_encoder: Optional[str] = None
    """Online mode: the local T5 folder (tokenizer and encoder, or a pipeline folder) for the captions."""
    online_keep_clips: int = 256
    """Online mode: encoded clips kept in memory (least recently used dropped) for reuse in later epochs;
    0 encodes every clip at every use."""
    fps: float = 8.0
    """Frame rate clips are sampled at when decoding real videos (CogVideoX: 8)."""
    buckets: Optional[list[str]] = None
    """Resolution/duration buckets as FRAMESxHEIGHTxWIDTH (pixels), e.g. [49x480x720, 49x720x480, 1x480x720];
    None: one bucket of num_frames x height x width."""
    small_buckets: SmallBuckets = "drop"
    """A bucket holding fewer clips than the global batch is never drawn (every batch comes from one bucket).
    'drop': leave its clips out, named in a warning and in the bucket table; 'merge': move them to the nearest
    bucket that fills a global batch (the bucket a clip would go to among those: one it has the frames for, then
    the nearest aspect ratio, the longest duration, the closest resolution) and decode them at that bucket's size
    (resized to cover it, centre-cropped). A latent cache merges when it is encoded (`cogvx data encode` with the
    run's training.global_batch_size), online mode and synthetic data when training opens them. Not used with
    data.packing, which leaves no clip out."""

    packing: bool = False
    """Pack clips of different sizes and durations into sequences of at most `pack_tokens` tokens (each clip
    with its own timestep, attention kept inside the clip); training.global_batch_size then counts packs and
    a micro-batch is one pack."""
    pack_tokens: Optional[int] = None
    """Token budget of a pack, text tokens included (with data.packing; at least the longest clip)."""
    pack_window: int = 4096
    """Clips packed together best-fit-decreasing (a larger window packs tighter)."""
    valid: Optional[str] = None
    """The validation set of training.valid_every: a latent cache, a manifest, a latent folder or 'synthetic' (read
    like `source`, without packing, stages or the image mix)."""
    filters: Optional[list] = None
    """Keep only the clips whose manifest columns lie in bounds: a list of {column, min, max} (either bound may be
    left out; both inclusive), e.g. [{column: motion_score, min: 0.3}, {column: aesthetic_score, min: 5.0}]. Any
    numeric column of the manifest counts (the scores of `cogvx data score`, a user's own). A clip without a
    value for a filtered column is left out. Applied when the manifest or clip index is planned (online mode and
    `cogvx data encode`); the clips kept and dropped per filter are printed when a stage opens. Per stage in
    `data.stages`, so thresholds can tighten as training goes on."""
    captions: Optional[list[str]] = None
    """The manifest columns a clip's caption may come from, in order of preference, e.g. [dense_caption, caption]
    (`cogvx data caption` writes dense_caption); None: caption. A clip holding none of them is left out."""
    caption_pick: CaptionPick = "first"
    """'first': the first of `captions` the clip holds, fixed when the manifest is planned (online mode and the
    latent cache alike); 'random': one of those it holds at every use, drawn by the clip's place in the run
    (seed, step, slot), so a resume or another layout picks the same (online mode only: a latent cache stores one
    caption's embedding per clip)."""
    stages: Optional[list] = None
    """Progressive training: a list of stages, each {until_step: N (absent on the last), and any of buckets,
    source, pack_tokens, num_frames, height, width, images, image_ratio, filters}, overriding these data fields
    from the previous stage's end until step N. Each stage starts its own data order at its first step."""
    images: Optional[str] = None
    """An image shard index (`cogvx data index-images TARS --output INDEX`: one row per webdataset/img2dataset tar
    of images and KEY.txt captions): the images of the image steps of data.image_ratio, trained on as 1-frame clips
    in the 1-frame buckets of data.buckets, read from inside the tars and encoded on the fly with `vae` and
    `text_encoder`, as online mode encodes a manifest. None: the image steps draw from the 1-frame buckets of
    `source`."""
    image_ratio: Optional[float] = None
    """Images mixed with videos, as CogVideoX trains: the share of the steps (0..1) that are image steps. Step s is
    an image step when floor((s+1)r) > floor(sr), so image steps are spread evenly; an image step draws a global
    batch from the 1-frame buckets (of `images`, or of `source`), a video step from the other buckets, each stream
    in its own keyed order (a resume needs only the step). Online mode (a manifest or clip index as `source`); not
    with data.packing. None: no mixing, every bucket drawn in proportion to its clips."""

    def merge_below(self, global_batch: int) -> Optional[int]:
        """The global batch under which a bucket's clips are merged into another (data.small_buckets=merge, not
        packing); None: no merging."""
        return global_batch if self.small_buckets == "merge" and not self.packing else None

    def bucket_names(self) -> list[str]:
        return list(self.buckets) if self.buckets else [f"{self.num_frames}x{self.height}x{self.width}"]

    def stage_configs(self) -> list[tuple[int, Optional[int], "DataConfig"]]:
        """[(first step, end step or None, the data config of the stage)]: one entry without stages."""
        if not self.stages:
            return [(0, None, self)]
        out, start = [], 0
        for index, stage in enumerate(self.stages):
            name = f"data.stages[{index}]"
            if not isinstance(stage, dict):
                raise ConfigError(name, stage, "write a stage as a mapping, e.g. {until_step: 1000, buckets: [...]}")
            unknown = set(stage) - STAGE_FIELDS - {"until_step"}
            if unknown:
                raise ConfigError(name, stage, f"unknown stage fields {sorted(unknown)}; a stage sets until_step and "
                                               f"any of {', '.join(sorted(STAGE_FIELDS))}")
            end = stage.get("until_step")
            last = index == len(self.stages) - 1
            if end is None and not last:
                raise ConfigError(f"{name}.until_step", None, "every stage but the last needs until_step")
            if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end <= start):
                raise ConfigError(f"{name}.until_step", end, f"use an integer step after the stage's start ({start})")
            values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
            values.update({k: v for k, v in stage.items() if k != "until_step"})
            values["stages"] = None
            config = DataConfig(**values)
            out.append((start, end, config))
            start = end
        return out

    def validate_image_mix(self) -> None:
        """data.image_ratio and data.images: a share of the steps, with buckets for each stream it draws."""
        ratio = self.image_ratio
        if self.images is not None and ratio is None:
            raise ConfigError("data.images", self.images, "set data.image_ratio too: the share of the steps that "
                                                          "are image steps (e.g. 0.1)")
        if ratio is None:
            return
        if isinstance(ratio, bool) or not 0 <= ratio <= 1:
            raise ConfigError("data.image_ratio", ratio, "use a share of the steps between 0 and 1, or null (no "
                                                         "mixing)")
        if self.packing:
            raise ConfigError("data.image_ratio", ratio, "is not used with data.packing (packs hold clips of every "
                                                         "size already): set data.image_ratio=null or "
                                                         "data.packing=false")
        frames = [int(str(bucket).lower().split("x")[0]) for bucket in self.bucket_names()]
        if ratio > 0 and 1 not in frames:
            raise ConfigError("data.buckets", self.buckets, f"data.image_ratio={ratio} trains image steps, which "
                                                            f"draw from 1-frame buckets: add one, e.g. "
                                                            f"1x{self.height}x{self.width}")
        if ratio < 1 and not any(f > 1 for f in frames):
            raise ConfigError("data.buckets", self.buckets, f"data.image_ratio={ratio} trains video steps, which "
                                                            f"draw from buckets of more than one frame: add one, or "
                                                            f"set data.image_ratio=1")

    def latent_shape(self, model: ModelConfig) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width)."""
        return ((self.num_frames - 1) // model.temporal_compression_ratio + 1,
                self.height // self.spatial_compression_ratio, self.width // self.spatial_compression_ratio)

    def validate(self, model: ModelConfig) -> None:
        check_choices(self, "data")
        check_frame_count("data.num_frames", self.num_frames, model.temporal_compression_ratio)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % self.spatial_compression_ratio:
                raise ConfigError(f"data.{name}", value,
                                  f"must be a multiple of the VAE's spatial compression {self.spatial_compression_ratio}")
            latent = value // self.spatial_compression_ratio
            if latent % model.patch_size:
                raise ConfigError(f"data.{name}", value,
                                  f"the latent {name} {latent} is not divisible by model.patch_size={model.patch_size}; "
                                  f"use a multiple of {self.spatial_compression_ratio * model.patch_size}")
        latent_frames = self.latent_shape(model)[0]
        if model.patch_size_t and latent_frames % model.patch_size_t:
            raise ConfigError("data.num_frames", self.num_frames,
                              f"gives {latent_frames} latent frames, not divisible by model.patch_size_t="
                              f"{model.patch_size_t}; use 1+4k frames with (1+k) a multiple of {model.patch_size_t}")
        if model.positional_embedding == "rope+learned" and (
                self.height // self.spatial_compression_ratio, self.width // self.spatial_compression_ratio) != (
                model.sample_height, model.sample_width):
            raise ConfigError("data.height", self.height,
                              "learned positions exist only for the model's sample resolution: use "
                              f"{model.sample_height * self.spatial_compression_ratio}x"
                              f"{model.sample_width * self.spatial_compression_ratio}")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers", self.num_workers, "use 0 (decode in the calling thread) or more")
        if self.online_keep_clips < 0:
            raise ConfigError("data.online_keep_clips", self.online_keep_clips, "use 0 (keep none) or more")
        if self.packing and (self.pack_tokens is None or isinstance(self.pack_tokens, bool)
                             or not isinstance(self.pack_tokens, int) or self.pack_tokens < 1):
            raise ConfigError("data.pack_tokens", self.pack_tokens, "data.packing=true needs a positive token budget "
                                                                    "per pack (text tokens included)")
        if self.pack_window < 1:
            raise ConfigError("data.pack_window", self.pack_window, "use 1 or more clips")
        if self.stages is not None and not isinstance(self.stages, list):
            raise ConfigError("data.stages", self.stages, "use a list of stages")
        if self.stages:
            for _, _, stage in self.stage_configs():
                stage.validate(model)
        if self.num_synthetic_clips < 1:
            raise ConfigError("data.num_synthetic_clips", self.num_synthetic_clips, "use at least 1")
        if not self.fps > 0:
            raise ConfigError("data.fps", self.fps, "use a positive frame rate")
        for bucket in self.buckets or []:
            parts = str(bucket).lower().split("x")
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                raise ConfigError("data.buckets", bucket, "write a bucket as FRAMESxHEIGHTxWIDTH, e.g. 49x480x720")
            frames, height, width = map(int, parts)
            check_frame_count("data.buckets", frames, model.temporal_compression_ratio)
            unit = self.spatial_compression_ratio * model.patch_size
            if height % unit or width % unit:
                raise ConfigError("data.buckets", bucket, f"height and width must be multiples of {unit} (VAE "
                                                          f"compression x patch size)")
        if not self.stages:  # with stages, each stage is checked with its own buckets
            self.validate_image_mix()
        self.validate_filters()
        if self.captions is not None and (not isinstance(self.captions, list) or not self.captions or not all(
                isinstance(c, str) and c for c in self.captions)):
            raise ConfigError("data.captions", self.captions, "use a list of manifest column names, e.g. "
                                                              "[dense_caption, caption]")

    def validate_filters(self) -> None:
        """data.filters: a list of {column, min, max} with numbers as bounds and at least one bound."""
        if self.filters is None:
            return
        if not isinstance(self.filters, list):
            raise ConfigError("data.filters", self.filters, "use a list of {column: NAME, min: X, max: Y}")
        for index, item in enumerate(self.filters):
            name = f"data.filters[{index}]"
            if not isinstance(item, dict) or not isinstance(item.get("column"), str) or not item["column"]:
                raise ConfigError(name, item, "write a filter as {column: NAME, min: X, max: Y} (a bound may be left "
                                              "out)")
            unknown = set(item) - FILTER_KEYS
            if unknown:
                raise ConfigError(name, item, f"unknown keys {sorted(unknown)}; a filter has column, min and max")
            for bound in ("min", "max"):
                value = item.get(bound)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise ConfigError(f"{name}.{bound}", value, "use a number (or leave the bound out)")
            if item.get("min") is None and item.get("max") is None:
                raise ConfigError(name, item, "give min, max or both")
            if item.get("min") is not None and item.get("max") is not None and item["min"] > item["max"]:
                raise ConfigError(name, item, "min is above max: no clip could pass")
