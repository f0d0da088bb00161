"""`cogvx data encode`: a manifest into a latent cache (decode -> VAE posterior moments + T5 embeddings).

Everything that can be refused is refused before the first clip is encoded, with one line and nothing written:
a manifest with no clip to encode, one whose files are all gone, a VAE whose latents do not have the model's
channels, a T5 of another width, an output holding something else. An encode in which every clip failed writes
nothing either (the store it began is removed) and exits non-zero. The summary ends with the table of buckets at
the run's global batch (`data/accounting.py`), naming the buckets that never fill one.

Many nodes: `--jobs N --job I` (or the task of a SLURM job array) writes the shards i mod N == I; each job may be a
torchrun of several ranks, and any job may start, stop and resume on its own. The first job's first rank creates
the store (a race between creators leaves one store, `cache.create_store`); each shard is claimed before it is
written (`cache.claim_shard`), so two jobs given the same shard write it once.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.accounting import config_bucket_table, small_bucket_warning
from cogvx_mega.data.cache import (CLAIM_TIMEOUT_S, CachePlan, check_output, committed, create_store, encode_cache,
                                   job_of_environment, missing_files, plan_from_manifest, usable_clips)
from cogvx_mega.data.encoder import ClipEncoder
from cogvx_mega.data.text import T5TextEncoder
from cogvx_mega.tools.load import load_vae

logger = logging.getLogger(__name__)

DEFAULT_SHARD_CLIPS = 2048
"""Clips per encode shard, and per shard file of every array: a million clips make ~3,000 files (per 2,048 clips
one file each of mean, logvar, first_frame and text, a commit marker and a claim: 489 x 6, plus the text_row chunks
and the metadata); the writer holds a window of `cache.DECODE_WINDOW` clips, not the shard."""


def check_vae_channels(vae, config, flag: str, path: str) -> None:
    """The VAE makes the latents the model trains on: model.out_channels channels (the preset's)."""
    channels = vae.config.latent_channels
    if channels != config.model.out_channels:
        raise ConfigError(flag, path, f"makes {channels}-channel latents; the model's video latents have "
                                      f"model.out_channels={config.model.out_channels} (preset "
                                      f"{config.preset!r}): pass the VAE of that model, or the preset of this VAE")


def load_encoders(config, vae_path: str, text_encoder_path: str, device: str, vae_flag: str = "--vae",
                  text_flag: str = "--text-encoder"):
    """The VAE and the T5 text encoder, each checked against the model (latent channels, text width) as soon as
    it is loaded, before any clip is encoded."""
    vae = load_vae(vae_path, device=device)
    check_vae_channels(vae, config, vae_flag, vae_path)
    text_encoder = T5TextEncoder(text_encoder_path, max_length=config.model.max_text_seq_length, device=device)
    if text_encoder.width != config.model.text_embed_dim:
        raise ConfigError(text_flag, text_encoder_path,
                          f"gives {text_encoder.width}-wide embeddings; the model takes "
                          f"model.text_embed_dim={config.model.text_embed_dim}")
    return vae, text_encoder


def encode_global_batch(config) -> int:
    """The global batch the cache is planned for: training.global_batch_size, or micro_batch_size when it is
    unset (one data-parallel rank); pass the training run's config (or training.global_batch_size=G)."""
    return config.training.global_batch(1)


def check_plan(plan: CachePlan, manifest: str, skipped: list[str], buckets: list[str]) -> None:
    """A manifest with nothing to encode is one clear error: no clip fits a bucket, or every clip's file is gone."""
    if not plan.shards:
        if not skipped:
            raise ConfigError("--manifest", manifest, "lists no clip; nothing written")
        raise ConfigError("--manifest", manifest, f"none of its {len(skipped)} lines gives a clip to encode (see the "
                                                  f"lines above: no caption, or fitting no bucket of "
                                                  f"{', '.join(buckets)}); nothing written")
    planned = sum(len(items) for items in plan.clips.values())
    missing = missing_files(plan, stop_at_first_found=True)
    if len(missing) == planned:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ConfigError("--manifest", manifest, f"the files of all {planned} of its clips are missing ({shown}); "
                                                  f"moved since `cogvx data scan`? scan the folder again; nothing "
                                                  f"written")


def resolve_jobs(jobs: Optional[int], job: Optional[int]) -> tuple[int, int]:
    """(this job, jobs): `--jobs N --job I`, else the SLURM job array's task, else (0, 1)."""
    if jobs is None and job is None:
        return job_of_environment()
    if jobs is None or job is None:
        raise ConfigError("--jobs" if jobs is None else "--job", None, "give --jobs N and --job I together (this "
                                                                       "job's number, 0 to N-1)")
    if jobs < 1:
        raise ConfigError("--jobs", jobs, "use a positive number of jobs")
    if not 0 <= job < jobs:
        raise ConfigError("--job", job, f"use 0 to {jobs - 1} (--jobs {jobs})")
    return job, jobs


def encode_manifest(config, manifest: str, vae_path: str, text_encoder_path: str, output: str,
                    shard_clips: int = DEFAULT_SHARD_CLIPS, device: Optional[str] = None, overwrite: bool = False,
                    jobs: Optional[int] = None, job: Optional[int] = None,
                    claim_timeout: float = CLAIM_TIMEOUT_S) -> dict:
    """Encode a manifest into a latent cache (see `cogvx_mega.data.cache`); under torchrun every rank takes
    its share of the shards, and with `jobs` (or in a SLURM job array) each job its share of them. Per-clip faults
    are skipped, printed and counted; returns the counts. With data.small_buckets=merge the clips of a bucket that
    holds fewer than the global batch (`encode_global_batch`) are encoded at the size of the nearest bucket that
    fills one."""
    import torch
    import torch.distributed as dist

    if shard_clips < 1:
        raise ConfigError("--shard-clips", shard_clips, "use a positive number of clips per shard")
    if claim_timeout <= 0:
        raise ConfigError("--claim-timeout", claim_timeout, "use a positive number of seconds")
    job, jobs = resolve_jobs(jobs, job)
    if overwrite and jobs > 1:
        raise ConfigError("--overwrite", True, f"would let each of the {jobs} jobs remove the store the others write; "
                                               f"remove it once before starting them, and start them without "
                                               f"--overwrite")
    output = Path(output)
    global_batch = encode_global_batch(config)
    buckets = config.data.bucket_names()
    plan, skipped = plan_from_manifest(manifest, buckets, config.data.fps, shard_clips,
                                       config.data.merge_below(global_batch), config.data.filters,
                                       config.data.captions)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        from cogvx_mega.parallel.state import init_torch_distributed

        init_torch_distributed(device)  # on CUDA: this rank's GPU, before the models go there
    rank = dist.get_rank() if world > 1 else 0
    if not plan.shards and rank == 0:  # the lines say why
        for line in skipped:
            print(line, file=sys.stderr)
    check_plan(plan, manifest, skipped, buckets)
    vae, text_encoder = load_encoders(config, vae_path, text_encoder_path, device)
    barrier = dist.barrier if world > 1 else (lambda: None)
    resuming = check_output(output, plan, overwrite)  # on every rank: a refusal stops them all
    for line in skipped if rank == 0 else []:  # every check has passed: the clips left out, then the work
        print(line, file=sys.stderr)
    barrier()
    if rank == 0:
        if output.exists() and overwrite:
            shutil.rmtree(output)
        resumed = len(committed(output)) if resuming else 0
        if jobs > 1:
            logger.info("job %d of %d: shards i mod %d == %d (%d of %d)", job, jobs, jobs, job,
                        len(plan.shards[job::jobs]), len(plan.shards))
        create_store(output, plan, vae.config.latent_channels, config.model.max_text_seq_length,
                     config.model.text_embed_dim, {"vae": os.path.abspath(vae_path),
                                                   "text_encoder": os.path.abspath(text_encoder_path),
                                                   "scaling_factor": vae.config.scaling_factor,
                                                   "fps": config.data.fps,
                                                   "small_buckets": config.data.small_buckets,
                                                   "global_batch": global_batch})
        if resumed:
            logger.info("resuming: %d of %d shards are already committed", resumed, len(plan.shards))
    barrier()
    with ClipEncoder(vae, text_encoder, config.data.fps, device, workers=config.data.num_workers) as encoder:
        counts = encode_cache(output, plan, encoder, rank, world, barrier=barrier, job=job, jobs=jobs,
                              claim_timeout=claim_timeout)
    markers = committed(output)  # every rank: all of them refuse a cache that holds nothing
    clips = {bucket: len(indices) for bucket, indices in usable_clips(output, markers).items()}
    if not any(clips.values()) and len(markers) == len(plan.shards):  # finished, and nothing in it
        failed = [f for marker in markers.values() for f in marker["failed"]]
        barrier()  # every rank has read the markers before rank 0 removes them
        if rank == 0:
            shutil.rmtree(output, ignore_errors=True)
        example = f" (e.g. {failed[0]['path']}: {failed[0]['reason']})" if failed else ""
        raise ConfigError("--manifest", manifest, f"none of its {len(failed)} clips could be encoded{example}; every "
                                                  f"one is listed above; nothing written")
    if rank == 0:
        print(encode_summary(config, output, plan, markers, clips, counts, len(skipped), global_batch))
        if len(markers) < len(plan.shards):
            print(f"{len(markers)} of {len(plan.shards)} shards are committed"
                  + (f"; {len(counts['left'])} of this rank's are being written by other writers" if counts["left"]
                     else "") + "; run the same `cogvx data encode` again once the other jobs end, to finish the "
                                "cache or check that it is finished", file=sys.stderr)
        warning = None if config.data.packing or len(markers) < len(plan.shards) else small_bucket_warning(
            clips, global_batch, config.data.small_buckets,
            fix="training with this cache never draws them; re-encode with data.small_buckets=merge to encode "
                "their clips at the nearest bucket that fills a global batch, or train with a smaller "
                "training.global_batch_size or data.packing")
        if warning:
            print(warning, file=sys.stderr)
    return counts


def encode_summary(config, output: Path, plan: CachePlan, markers: dict, clips: dict[str, int], counts: dict,
                   skipped: int, global_batch: int) -> str:
    """What the encode wrote: clips, skipped clips, this rank's speed, and the table of buckets."""
    failed = sum(len(m["failed"]) for m in markers.values())
    encoded = counts["clips"] - counts["failed"]
    lines = [f"wrote {output}: {sum(clips.values())} clips in {sum(1 for c in clips.values() if c)} bucket(s), "
             f"{failed + skipped} skipped; this run encoded {encoded} clips on rank 0 "
             f"({encoded / max(counts['seconds'], 1e-9):.2f} clips/s)"]
    if plan.filtered:
        lines.append(plan.filtered["summary"])
    lines.append(config_bucket_table(clips, config, global_batch, merged=plan.merged, title="cache"))
    return "\n".join(lines)

