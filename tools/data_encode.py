"""`cogvx data encode`: a manifest into a latent cache (decode -> VAE posterior moments + T5 embeddings)."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.data.cache import check_output, committed, create_store, encode_cache, plan_from_manifest
from cogvx_mega.data.encoder import ClipEncoder
from cogvx_mega.data.text import T5TextEncoder
from cogvx_mega.tools.load import load_vae

logger = logging.getLogger(__name__)


def load_encoders(config, vae_path: str, text_encoder_path: str, device: str):
    """The VAE and the T5 text encoder, checked against the model's text width."""
    vae = load_vae(vae_path, device=device)
    text_encoder = T5TextEncoder(text_encoder_path, max_length=config.model.max_text_seq_length, device=device)
    if text_encoder.width != config.model.text_embed_dim:
        raise ConfigError("--text-encoder", text_encoder_path,
                          f"gives {text_encoder.width}-wide embeddings; the model takes "
                          f"model.text_embed_dim={config.model.text_embed_dim}")
    return vae, text_encoder


def encode_manifest(config, manifest: str, vae_path: str, text_encoder_path: str, output: str,
                    shard_clips: int = 16, device: Optional[str] = None, overwrite: bool = False) -> dict:
    """Encode a manifest into a latent cache (see `cogvx_mega.data.cache`); under torchrun every rank takes
    its share of the shards. Per-clip faults are skipped, printed and counted; returns the counts."""
    import torch
    import torch.distributed as dist

    if shard_clips < 1:
        raise ConfigError("--shard-clips", shard_clips, "use a positive number of clips per shard")
    output = Path(output)
    plan, skipped = plan_from_manifest(manifest, config.data.bucket_names(), config.data.fps, shard_clips)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        from cogvx_mega.parallel.state import init_torch_distributed

        init_torch_distributed(device)  # on CUDA: this rank's GPU, before the models go there
    rank = dist.get_rank() if world > 1 else 0
    for line in skipped if rank == 0 else []:
        print(line, file=sys.stderr)
    if not plan.shards:
        raise ConfigError("--manifest", manifest, "no clip of it fits a bucket; nothing written")
    vae, text_encoder = load_encoders(config, vae_path, text_encoder_path, device)
    barrier = dist.barrier if world > 1 else (lambda: None)
    resuming = check_output(output, plan, overwrite)  # on every rank: a refusal stops them all
    barrier()
    if rank == 0:
        if output.exists() and overwrite:
            shutil.rmtree(output)
        resumed = len(committed(output)) if resuming else 0
        create_store(output, plan, vae.config.latent_channels, config.model.max_text_seq_length,
                     config.model.text_embed_dim, {"vae": os.path.abspath(vae_path),
                                                   "text_encoder": os.path.abspath(text_encoder_path),
                                                   "scaling_factor": vae.config.scaling_factor,
                                                   "fps": config.data.fps})
        if resumed:
            logger.info("resuming: %d of %d shards are already committed", resumed, len(plan.shards))
    barrier()
    with ClipEncoder(vae, text_encoder, config.data.fps, device, workers=config.data.num_workers) as encoder:
        counts = encode_cache(output, plan, encoder, rank, world, barrier=barrier)
    if rank == 0:
        markers = committed(output)
        failed = sum(len(m["failed"]) for m in markers.values())
        print(f"wrote {output}: {sum(m['clips'] for m in markers.values()) - failed} clips in "
              f"{len(plan.clips)} bucket(s), {failed + len(skipped)} skipped; this run encoded "
              f"{counts['clips']} clips on rank 0 ({counts['clips'] / max(counts['seconds'], 1e-9):.2f} clips/s)")
    return counts
