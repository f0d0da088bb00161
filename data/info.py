"""`cogvx data info CACHE|MANIFEST`: what a latent cache holds, or what a manifest would make.

A latent cache (`cache.py`): what it was made from (VAE, text encoder, frame rate, latent scale, the small-bucket
policy and global batch it was planned for), its fingerprint, its layout (format, stored dtype, clips per shard
file, distinct captions), its committed shards, and per bucket the usable clips, the clips that failed to encode,
the latent size and the batches per epoch at the config's global batch.
A manifest (`manifest.py`): its clips (videos, images), the lines left out and why, and the clips per bucket it
would make at the config's data.buckets and data.fps (with data.small_buckets=merge, after merging), as
`cogvx data encode` would plan them. The global batch is training.global_batch_size, or micro_batch_size when it
is unset (one data-parallel rank).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.accounting import config_bucket_table
from cogvx_mega.data.cache import CACHE_FORMAT, CACHE_FORMAT_V1, TEXT, committed, usable_clips
from cogvx_mega.data.index import INDEX_FILE, ClipIndex, filter_summary, index_for

def describe_data(path: str, config) -> str:
    """The report of `cogvx data info` on a latent cache or a manifest; one clear error for anything else."""
    where = Path(path)
    if (where / "zarr.json").is_file():
        return describe_cache(where, config)
    if where.is_file() or (where / INDEX_FILE).is_file():
        try:
            return describe_manifest(where, config)
        except ConfigError as error:
            if error.field_name != "--manifest":
                raise
            raise ConfigError("CACHE|MANIFEST", path, f"not a manifest: {error.fix}") from None
    raise ConfigError("CACHE|MANIFEST", path, "neither a latent cache (cogvx data encode) nor a manifest (cogvx data "
                                              "scan) is there")


def describe_cache(path: Path, config) -> str:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    attrs = group.attrs.asdict()
    if attrs.get("format") not in (CACHE_FORMAT, CACHE_FORMAT_V1):
        raise ConfigError("CACHE|MANIFEST", str(path), f"a zarr store but not a {CACHE_FORMAT} cache")
    v1 = attrs["format"] == CACHE_FORMAT_V1
    markers = committed(path)
    planned = attrs.get("shard_count")
    usable = usable_clips(path, markers)
    failed = Counter(name.split("/")[1] for name, marker in markers.items() for _ in marker["failed"])
    clips, latents = {}, {}
    for bucket in attrs.get("buckets", []):
        if bucket not in usable and bucket not in failed:
            continue  # planned empty (or merged away), or no shard committed yet
        clips[bucket] = len(usable.get(bucket, []))
        shape = group[f"{bucket}/mean"].shape[1:]  # [C, T', H', W']
        latents[bucket] = "x".join(str(n) for n in shape)
    done = "complete" if planned is None or len(markers) >= planned else (
        "unfinished: run the same `cogvx data encode` again to finish it; training refuses it until then")
    if v1:
        text = next((group[f"{b}/text"].shape[1:] for b in attrs.get("buckets", [])), None)
        layout = f"{CACHE_FORMAT_V1}: float32, one file per clip and array (re-encode it to store it in ~half the bytes)"
    else:
        text = group[TEXT].shape[1:]
        planned_clips = sum(attrs.get("clips", {}).values())
        layout = (f"{CACHE_FORMAT}: {attrs.get('stored_dtype')} moments and text, {attrs.get('shard_clips')} clips "
                  f"per shard file; {attrs.get('text_rows')} distinct captions of {planned_clips} planned clips")
    lines = [f"latent cache {path}",
             f"  fingerprint  {attrs.get('fingerprint')}",
             f"  made from    VAE {attrs.get('vae')} (latent scale {attrs.get('scaling_factor')}), text encoder "
             f"{attrs.get('text_encoder')}, {attrs.get('fps')} fps",
             f"  planned for  data.small_buckets={attrs.get('small_buckets', 'drop')} at a global batch of "
             f"{attrs.get('global_batch', 'unknown')}" if "global_batch" in attrs else
             "  planned for  (not recorded: written by an older version)",
             f"  layout       {layout}",
             f"  shards       {len(markers)} of {planned if planned is not None else '?'} committed ({done})",
             f"  clips        {sum(clips.values())} usable, {sum(failed.values())} failed to encode"
             + (f"; text embeddings {text[0]} tokens x {text[1]}" if text else "")]
    columns = {"failed": {b: failed.get(b, 0) for b in clips}, "latents CxT'xH'xW'": latents}
    lines.append(config_bucket_table(clips, config, config.training.global_batch(1), merged=attrs.get("merged") or {},
                                     columns=columns, title="buckets"))
    return "\n".join(lines)


def describe_manifest(path: Path, config) -> str:
    data = config.data
    global_batch = config.training.global_batch(1)
    if path.is_dir():  # a clip index (`cogvx data index`): described as it was built
        index = ClipIndex.open(path)
        data = dataclasses.replace(data, buckets=index.buckets, fps=index.meta["fps"])
        config = dataclasses.replace(config, data=data)
    else:
        index = index_for(path, data.bucket_names(), data.fps, data.merge_below(global_batch), flag="--manifest",
                          filters=data.filters, captions=data.captions)
    kinds = index.meta["kinds"]
    clips = index.clip_counts()
    reasons = Counter(line.rsplit(": ", 1)[-1] for line in index.skipped_examples)
    shown = "".join(f"; {n}: {reason}" for reason, n in reasons.items())
    if index.skipped > len(index.skipped_examples):
        shown += f" (the reasons of the first {len(index.skipped_examples)})"
    lines = [f"manifest {path}: {index.meta['lines']} clips ({kinds.get('video', 0)} videos, {kinds.get('image', 0)} "
             f"images)",
             f"  planned at   data.buckets {', '.join(data.bucket_names())}, {data.fps:g} fps, "
             f"data.small_buckets={data.small_buckets}",
             f"  left out     {index.skipped}" + shown]
    summary = filter_summary(index)
    if summary:
        lines.append(summary)
    lines.append(config_bucket_table(clips, config, global_batch, merged=index.merged, title="buckets"))
    return "\n".join(lines)
