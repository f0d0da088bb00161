"""`cogvx data scan|index|encode|info|index-images`: media folder -> manifest -> latent cache, what a cache or
manifest holds, and the index of webdataset/img2dataset tar shards of images (data.images)."""
from __future__ import annotations

import argparse
import os

from cogvx_mega.cli.arguments import add_config_arguments, verbose_parent

NAME = "data"
HELP = "prepare training data: scan media into a manifest, encode it into a latent cache, show what they hold"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="data_command", required=True)
    scan = actions.add_parser("scan", parents=[verbose_parent()], help="probe every video and image under DIR")
    scan.add_argument("source", metavar="DIR")
    scan.add_argument("--output", required=True, help="the manifest to write (JSONL, one clip a line)")
    scan.add_argument("--captions", help="JSONL or CSV of (path, caption); otherwise a sidecar .txt per file")
    scan.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="parallel probes")
    scan.add_argument("--overwrite", action="store_true")
    scan.add_argument("--part", default=None, metavar="I/N",
                      help="scan part I of N (0-based) and merge when all are written; under torchrun or a SLURM job "
                           "array the task's place is used without this flag")
    index = actions.add_parser("index", parents=[verbose_parent()],
                               help="a manifest as a clip index (Parquet, by bucket) for corpora of millions of clips")
    index.add_argument("manifest", metavar="MANIFEST")
    index.add_argument("--output", required=True, help="the index folder to write")
    index.add_argument("--overwrite", action="store_true")
    add_config_arguments(index)  # the buckets, fps and (data.small_buckets=merge) global batch it is built for
    encode = actions.add_parser("encode", parents=[verbose_parent()],
                                help="decode, VAE-encode and T5-encode a manifest into a zarr latent cache")
    encode.add_argument("--manifest", required=True)
    encode.add_argument("--vae", required=True, help="diffusers AutoencoderKLCogVideoX folder or cogvx-mega VAE")
    encode.add_argument("--text-encoder", required=True, help="local T5 folder (or a pipeline folder)")
    encode.add_argument("--output", required=True, help="the zarr store (an interrupted one resumes)")
    encode.add_argument("--shard-clips", type=int, default=16, help="clips per committed shard")
    encode.add_argument("--device", choices=("cpu", "cuda"), default=None)
    encode.add_argument("--overwrite", action="store_true")
    add_config_arguments(encode)
    info = actions.add_parser("info", parents=[verbose_parent()],
                              help="what a latent cache holds (buckets, sizes, shards) or a manifest would make")
    info.add_argument("path", metavar="CACHE|MANIFEST")
    add_config_arguments(info)  # the buckets, fps and global batch a manifest is planned at
    images = actions.add_parser("index-images", parents=[verbose_parent()],
                                help="index webdataset/img2dataset tar shards of images and captions (one row per "
                                     "shard) for data.images")
    images.add_argument("sources", metavar="TAR", nargs="+", help="tar shards, or folders of them")
    images.add_argument("--output", required=True, help="the index folder to write")
    images.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="tars read in parallel")
    images.add_argument("--overwrite", action="store_true")


def run(args: argparse.Namespace) -> int:
    return {"scan": run_scan, "index": run_index, "encode": run_encode, "info": run_info,
            "index-images": run_index_images}[args.data_command](args)


def run_scan(args: argparse.Namespace) -> int:
    from cogvx_mega.config.errors import ConfigError
    from cogvx_mega.tools.data_scan import scan_folder

    part = None
    if args.part is not None:
        try:
            part = tuple(int(v) for v in args.part.split("/"))
        except ValueError:
            part = ()
        if len(part) != 2:
            raise ConfigError("--part", args.part, "write I/N, e.g. 3/16 for the fourth of 16 parts")
    summary = scan_folder(args.source, args.output, args.captions, args.workers, args.overwrite, part)
    if not summary.merged:
        print(f"scanned {summary.files} files of this part: {summary.clips} clips, {summary.skipped} skipped; the "
              f"last part to finish writes {args.output}")
        return 0
    print(f"scanned {summary.files} files: {summary.clips} clips ({summary.videos} videos, "
          f"{summary.clips - summary.videos} images) written to {args.output}, {summary.skipped} skipped")
    return 0


def run_index(args: argparse.Namespace) -> int:
    """The index that `--data INDEX` (online mode) and `cogvx data encode --manifest INDEX` read without holding the
    manifest in memory; built for the config's data.buckets, data.fps and small-bucket merging."""
    from cogvx_mega.cli.arguments import resolve_config
    from cogvx_mega.config.errors import refuse_existing_output
    from cogvx_mega.data.index import build_index

    refuse_existing_output("--output", args.output, args.overwrite, what="folder")
    config = resolve_config(args)
    data = config.data
    index = build_index(args.manifest, args.output, data.bucket_names(), data.fps,
                        data.merge_below(config.training.global_batch(1)), progress=True)
    print(f"indexed {len(index)} clips of {index.meta['lines']} manifest lines into {args.output} "
          f"({index.skipped} left out)")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    """Every rank under torchrun takes its share of the shards; a restarted encode resumes."""
    from cogvx_mega.cli.arguments import resolve_config
    from cogvx_mega.config.errors import check_writable
    from cogvx_mega.tools.data_encode import encode_manifest

    check_writable("--output", args.output, folder=True)  # the store is written in place: before any encoder loads
    encode_manifest(resolve_config(args), args.manifest, args.vae, args.text_encoder, args.output,
                    shard_clips=args.shard_clips, device=args.device, overwrite=args.overwrite)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from cogvx_mega.cli.arguments import resolve_config
    from cogvx_mega.data.info import describe_data

    print(describe_data(args.path, resolve_config(args)))
    return 0


def run_index_images(args: argparse.Namespace) -> int:
    """One Parquet row per tar shard (never one per image); a tar that cannot be read is skipped, one line each."""
    import sys

    from cogvx_mega.config.errors import refuse_existing_output
    from cogvx_mega.data.image_shards import build_image_index

    refuse_existing_output("--output", args.output, args.overwrite, what="folder")
    index, skipped = build_image_index(args.sources, args.output, args.workers, progress=True)
    for line in skipped:
        print(line, file=sys.stderr)
    mixed = index.meta["mixed_sizes"]
    print(f"indexed {len(index)} shards ({index.images} images) into {args.output}, {len(skipped)} tar(s) skipped"
          + (f"; {mixed} shard(s) hold images of several sizes (each goes to the bucket of its most common size)"
             if mixed else ""))
    return 0
