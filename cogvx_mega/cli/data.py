"""`cogvx data scan|split|score|index|encode|info|index-images`: media folder -> manifest (cut into shots, scored)
-> latent cache, what a cache or manifest holds, and the index of webdataset/img2dataset tar shards of images
(data.images)."""
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
    scan.add_argument("--index", metavar="INDEX", default=None,
                      help="also write the clip index (cogvx data index) of the manifest, for the config's buckets")
    add_config_arguments(scan)  # with --index: the buckets, fps and merging it is built for
    split = actions.add_parser("split", parents=[verbose_parent()],
                               help="cut every video of a manifest into shots (PySceneDetect), one line per shot")
    split.add_argument("manifest", metavar="MANIFEST")
    split.add_argument("--output", required=True, help="the manifest of shots to write")
    split.add_argument("--detector", choices=("content", "adaptive"), default="content",
                       help="PySceneDetect's ContentDetector (a threshold on the change between frames) or "
                            "AdaptiveDetector (a change that stands out from its neighbours'; fewer false cuts in "
                            "fast motion)")
    split.add_argument("--threshold", type=float, default=27.0, help="content: the mean HSV change (0-255) of a cut")
    split.add_argument("--adaptive-threshold", type=float, default=3.0,
                       help="adaptive: how many times its neighbours' mean change a cut's change is")
    split.add_argument("--min-content-val", type=float, default=15.0, help="adaptive: the least change of a cut")
    split.add_argument("--min-shot-seconds", type=float, default=None,
                       help="drop shorter shots (default: shots that fill the shortest video bucket of --preset/"
                            "--config when one is given, else 2.0 s)")
    split.add_argument("--detect-width", type=int, default=256, help="frames are downscaled to this width to detect")
    split.add_argument("--motion", action="store_true", help="also give each shot its motion_score, same decode")
    add_score_arguments(split, aesthetic=False)
    add_config_arguments(split)  # the buckets and fps a shot must fill
    score = actions.add_parser("score", parents=[verbose_parent()],
                               help="add motion_score (optical flow) and aesthetic_score (CLIP + LAION head) columns")
    score.add_argument("manifest", metavar="MANIFEST")
    score.add_argument("--output", help="the manifest to write (default: MANIFEST itself, replaced when done)")
    score.add_argument("--motion", action="store_true", help="motion_score: mean optical flow, Farneback (OpenCV) "
                                                             "or RAFT with --raft-weights")
    score.add_argument("--aesthetic", metavar="HEAD", help="aesthetic_score: the LAION aesthetic MLP head's weights "
                                                           "(e.g. sac+logos+ava1-l14-linearMSE.pth)")
    score.add_argument("--aesthetic-clip", metavar="DIR", help="the local CLIP model folder the head was trained on "
                                                               "(clip-vit-large-patch14 for LAION's)")
    score.add_argument("--aesthetic-frames", type=int, default=3, help="frames per clip scored and averaged")
    add_score_arguments(score, aesthetic=True)
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
    encode.add_argument("--shard-clips", type=int, default=None,
                        help="clips per shard: per shard file of every array, per commit and per claim (default 2048)")
    encode.add_argument("--jobs", type=int, default=None,
                        help="independent jobs sharing the encode, each taking the shards i mod N == I (default: the "
                             "tasks of a SLURM job array, else 1); each may be a torchrun of several ranks")
    encode.add_argument("--job", type=int, default=None, help="this job's number, 0 to N-1 (default: the SLURM array "
                                                              "task's)")
    encode.add_argument("--claim-timeout", type=float, default=None,
                        help="seconds without a heartbeat after which another machine's claim on a shard is taken "
                             "over (default 1800)")
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
    from cogvx_mega.tools import data_caption, data_dedup

    data_dedup.add_arguments(actions.add_parser("dedup", parents=[verbose_parent()], help=data_dedup.HELP))
    data_caption.add_arguments(actions.add_parser("caption", parents=[verbose_parent()], help=data_caption.HELP))


def usable_cores() -> int:
    """The cores this process may run on (a SLURM task's allocation), or the machine's where that is not known."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_score_arguments(parser: argparse.ArgumentParser, aesthetic: bool) -> None:
    """The flags `split` and `score` share: motion sampling, workers, parts, device."""
    parser.add_argument("--raft-weights", metavar="PATH",
                        help="motion by torchvision's RAFT-small with these weights (implies --motion)")
    parser.add_argument("--motion-fps", type=float, default=2.0, help="frame pairs scored per second of video")
    parser.add_argument("--motion-side", type=int, default=128, help="short side of the frames the flow is taken on")
    parser.add_argument("--every-frame", action="store_true",
                        help="decode every frame (exact cut frames); by default the frames no other frame refers to "
                             "(H.264/HEVC non-reference B-frames) are skipped: ~25%% faster, a cut at most a frame late")
    parser.add_argument("--workers", type=int, default=usable_cores(),
                        help="files decoded in parallel (default: the cores this process may use)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: decode with DALI on the GPU (where installed)" +
                             (", run CLIP and RAFT there" if aesthetic else ", run RAFT there"))
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--part", default=None, metavar="I/N",
                        help="do part I of N (0-based) and merge when all are written; under torchrun or a SLURM job "
                             "array the task's place is used without this flag")


def run(args: argparse.Namespace) -> int:
    return {"scan": run_scan, "split": run_split, "score": run_score, "index": run_index, "encode": run_encode,
            "info": run_info, "index-images": run_index_images, "dedup": run_dedup,
            "caption": run_caption}[args.data_command](args)


def run_dedup(args: argparse.Namespace) -> int:
    from cogvx_mega.tools.data_dedup import run as dedup

    return dedup(args)


def run_caption(args: argparse.Namespace) -> int:
    from cogvx_mega.tools.data_caption import run as caption

    return caption(args)


def parse_part(text):
    from cogvx_mega.tools.data_scan import parse_part as parsed

    return parsed(text)


def run_scan(args: argparse.Namespace) -> int:
    from cogvx_mega.config.errors import refuse_existing_output
    from cogvx_mega.tools.data_scan import scan_folder

    if args.index:
        refuse_existing_output("--index", args.index, args.overwrite, what="folder")
    part = parse_part(args.part)
    summary = scan_folder(args.source, args.output, args.captions, args.workers, args.overwrite, part)
    if not summary.merged:
        print(f"scanned {summary.files} files of this part: {summary.clips} clips, {summary.skipped} skipped; the "
              f"last part to finish writes {args.output}")
        return 0
    print(f"scanned {summary.files} files: {summary.clips} clips ({summary.videos} videos, "
          f"{summary.clips - summary.videos} images) written to {args.output}, {summary.skipped} skipped")
    if args.index:  # the task that wrote the manifest indexes it
        index_manifest(args, args.output, args.index)
    return 0


def motion_options(args: argparse.Namespace):
    from cogvx_mega.tools.data_curate import MotionOptions

    if not (args.motion or args.raft_weights):
        return None
    return MotionOptions(fps=args.motion_fps, side=args.motion_side, raft_weights=args.raft_weights)


def report_curation(summary, output: str, what: str) -> None:
    if not summary.merged:
        print(f"{what} this part: {summary.clips} clips, {summary.written} lines, {summary.failed} failed; the last "
              f"part to finish writes {output}")
    else:
        print(f"{what} {summary.clips} clips: {summary.written} lines written to {output}, {summary.failed} failed "
              f"(written unchanged)")
    print(summary.table())


def run_split(args: argparse.Namespace) -> int:
    """One line per shot long enough for training; the shortest video bucket of a config given sets what is long
    enough (--min-shot-seconds overrides it)."""
    from cogvx_mega.config.errors import ConfigError
    from cogvx_mega.data.shots import ShotOptions
    from cogvx_mega.tools.data_curate import SplitOptions, split_manifest

    for flag, value in (("--threshold", args.threshold), ("--adaptive-threshold", args.adaptive_threshold),
                        ("--detect-width", args.detect_width), ("--motion-fps", args.motion_fps)):
        if not value > 0:
            raise ConfigError(flag, value, "use a positive number")
    options = SplitOptions(ShotOptions(args.detector, args.threshold, args.adaptive_threshold, args.min_content_val,
                                       detect_width=args.detect_width), motion=motion_options(args),
                           every_frame=args.every_frame)
    if args.min_shot_seconds is not None:
        if args.min_shot_seconds < 0:
            raise ConfigError("--min-shot-seconds", args.min_shot_seconds, "use 0 or more seconds")
        options.min_shot_seconds = args.min_shot_seconds
    elif args.preset or args.config_file or args.overrides:
        from cogvx_mega.cli.arguments import resolve_config

        config = resolve_config(args)
        videos = [int(name.split("x")[0]) for name in config.data.bucket_names() if int(name.split("x")[0]) > 1]
        if videos:
            options.min_video_frames, options.data_fps = min(videos), config.data.fps
    summary = split_manifest(args.manifest, args.output, options, args.workers, args.overwrite,
                             parse_part(args.part), args.device)
    report_curation(summary, args.output, "split")
    return 0


def run_score(args: argparse.Namespace) -> int:
    """Score columns on every line; a clip that cannot be decoded keeps its line without them."""
    from cogvx_mega.tools.data_curate import ScoreOptions, score_manifest

    options = ScoreOptions(motion=motion_options(args), aesthetic=args.aesthetic, aesthetic_clip=args.aesthetic_clip,
                           aesthetic_frames=max(1, args.aesthetic_frames), every_frame=args.every_frame)
    summary = score_manifest(args.manifest, args.output, options, args.workers, args.overwrite,
                             parse_part(args.part), args.device)
    report_curation(summary, args.output or args.manifest, "scored")
    return 0


def run_index(args: argparse.Namespace) -> int:
    """The index that `--data INDEX` (online mode) and `cogvx data encode --manifest INDEX` read without holding the
    manifest in memory; built for the config's data.buckets, data.fps and small-bucket merging."""
    from cogvx_mega.config.errors import refuse_existing_output

    refuse_existing_output("--output", args.output, args.overwrite, what="folder")
    index_manifest(args, args.manifest, args.output)
    return 0


def index_manifest(args: argparse.Namespace, manifest: str, output: str) -> None:
    """The clip index of `manifest` at `output`, for the buckets, fps and merging of the command's config."""
    from cogvx_mega.cli.arguments import resolve_config
    from cogvx_mega.data.index import build_index

    config = resolve_config(args)
    data = config.data
    index = build_index(manifest, output, data.bucket_names(), data.fps,
                        data.merge_below(config.training.global_batch(1)), progress=True)
    print(f"indexed {len(index)} clips of {index.meta['lines']} manifest lines into {output} "
          f"({index.skipped} left out)")


def run_encode(args: argparse.Namespace) -> int:
    """Every rank under torchrun takes its share of the shards; a restarted encode resumes."""
    from cogvx_mega.cli.arguments import resolve_config
    from cogvx_mega.config.errors import check_writable
    from cogvx_mega.data.cache import CLAIM_TIMEOUT_S
    from cogvx_mega.tools.data_encode import DEFAULT_SHARD_CLIPS, encode_manifest

    check_writable("--output", args.output, folder=True)  # the store is written in place: before any encoder loads
    encode_manifest(resolve_config(args), args.manifest, args.vae, args.text_encoder, args.output,
                    shard_clips=DEFAULT_SHARD_CLIPS if args.shard_clips is None else args.shard_clips,
                    device=args.device, overwrite=args.overwrite, jobs=args.jobs, job=args.job,
                    claim_timeout=CLAIM_TIMEOUT_S if args.claim_timeout is None else args.claim_timeout)
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
