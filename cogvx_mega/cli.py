"""The `cogvx` command.

    cogvx train --preset tiny --data synthetic --steps 100 --run-dir runs/x [section.field=value ...]
    cogvx train ... --resume auto|CKPT       continue a run (model, optimizer, step) at any layout
    cogvx train ... --init-from PATH        start from weights (diffusers folder or cogvx-mega checkpoint)
    cogvx demo [--run-dir runs/demo] [--steps 300]
    cogvx convert diffusers-to-project SRC DST
    cogvx convert project-to-diffusers SRC DST
    cogvx convert sat-to-project SRC DST --preset NAME [--config FILE] [overrides]
    cogvx convert vae-diffusers-to-project | vae-project-to-diffusers SRC DST
    cogvx convert vae-sat-to-project SRC DST [--preset NAME]
    cogvx data scan DIR --output manifest.jsonl [--captions FILE] [--workers N]
    cogvx vae encode VIDEO LATENTS --vae PATH [--frames N] [--sample] [--chunk-frames N]
    cogvx vae decode LATENTS VIDEO --vae PATH [--chunk-frames N] [--fps F]
    cogvx sample --ckpt CKPT --vae VAE (--prompt TEXT --text-encoder T5 | --prompt-embeds FILE) [--image IMG]
                 --output out.mp4     (under torchrun: the transformer at --tp x --pp x --cp, the VAE split in time)
    cogvx plan --preset P --gpus N --gpu-mem GiB [--frames F --size HxW --fp8 --json]
    cogvx scaling plan|run|fit SPEC [--table runs.csv] [--json]
    cogvx launch slurm --nodes N --gpus-per-node G [--partition P --time T ...] [--dry-run] -- TRAIN_ARGS
    cogvx export diffusers --ckpt CKPT --vae VAE --text-encoder T5 --out DIR [--dtype bf16|fp32] [--overwrite]
    cogvx checkpoint verify CKPT | list RUN_DIR      sizes and CRC32C of every file (exit 1: damaged)
    cogvx export lora --ckpt LORA_CKPT --out DIR     pytorch_lora_weights.safetensors for load_lora_weights
    cogvx train ... finetune.lora_rank=R --init-from BASE [--init-lora DIR]    LoRA fine-tuning
    (under torchrun, `cogvx vae` splits time over all ranks: context parallel)

Errors a user can cause print one line, `cogvx: error: ...`, and exit with status 2 before anything is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Optional, Sequence

logger = logging.getLogger("cogvx_mega")

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # training.max_skipped_steps steps in a row were skipped


def _add_config_arguments(parser: argparse.ArgumentParser, with_training: bool = True) -> None:
    parser.add_argument("--preset", help="named preset (tiny, cogvideox-2b, cogvideox-5b, ...)")
    parser.add_argument("--config", dest="config_file", help="YAML/TOML config file applied over the preset")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    if not with_training:
        return
    parser.add_argument("--run-dir", help="where metrics, the resolved config and checkpoints go")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--micro-batch", type=int, help="samples per data-parallel rank per step")
    parser.add_argument("--data", help="a latent cache (cogvx data encode), a manifest (cogvx data scan; online "
                                       "mode, with --vae and --text-encoder), a latent folder or 'synthetic'")
    parser.add_argument("--vae", help="online mode: the VAE folder that encodes the manifest's clips")
    parser.add_argument("--text-encoder", help="online mode: the local T5 folder for the captions")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--tp", type=int, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=int, help="virtual pipeline stages per pipeline rank")
    parser.add_argument("--cp", type=int, help="context-parallel size")
    parser.add_argument("--resume", help="'auto' (newest complete checkpoint of the run) or a checkpoint folder")
    parser.add_argument("--init-from", metavar="PATH",
                        help="start from these weights (diffusers transformer or pipeline folder, single-file or "
                             "sharded cogvx-mega checkpoint) at step 0 with a fresh optimizer")
    parser.add_argument("--init-lora", metavar="DIR",
                        help="with --init-from: merge this diffusers/PEFT LoRA (pytorch_lora_weights.safetensors) "
                             "into the weights before training")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the layout, each pipeline rank's layers and parameter counts; do not train")
    parser.add_argument("--world-size", type=int, help="with --dry-run: the world size to plan for")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    mapping = {"run_dir": "training.run_dir", "steps": "training.steps", "seed": "training.seed",
               "micro_batch": "training.micro_batch_size", "data": "data.source", "vae": "data.vae",
               "text_encoder": "data.text_encoder", "device": "training.device",
               "tp": "parallel.tensor_model_parallel_size", "pp": "parallel.pipeline_model_parallel_size",
               "vpp": "parallel.virtual_pipeline_model_parallel_size", "cp": "parallel.context_parallel_size"}
    out = []
    for attribute, key in mapping.items():
        value = getattr(args, attribute, None)
        if value is not None:
            quoted = attribute in ("run_dir", "data", "vae", "text_encoder")  # paths stay strings
            out.append(f"{key}='{value}'" if quoted else f"{key}={value!s}")
    return out


def resolve_config(args: argparse.Namespace):
    from cogvx_mega.config import load_config

    return load_config(args.preset, args.config_file, [*args.overrides, *_flag_overrides(args)])


def run_training(config, resume: Optional[str] = None, init_from: Optional[str] = None,
                 init_lora: Optional[str] = None) -> list[dict]:
    """`cogvx train`: every check that can fail runs before anything is written (one clear error), then
    the resolved config is written, the weights come from `--resume` (model, optimizer, step) or
    `--init-from` (weights only, step 0), and the run trains. With both, an existing checkpoint of the run
    wins (a requeued fine-tuning job continues), otherwise the run starts from the `--init-from` weights."""
    import torch.distributed as dist

    from cogvx_mega.checkpoint.meta import SHARDED_FORMAT, read_checkpoint_meta
    from cogvx_mega.config import write_resolved_config
    from cogvx_mega.config.schema import ConfigError
    from cogvx_mega.tools.training_data import open_training_data
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training import checkpoint as ckpt
    from cogvx_mega.training.pretrained import load_pretrained_weights
    from cogvx_mega.training.trainer import Trainer

    run_dir = config.training.run_dir
    device = config.training.device
    lora = config.finetune.lora
    lora_base = None  # LoRA: what the adapters' checkpoints point at
    if init_lora is not None and init_from is None:
        raise ConfigError("--init-lora", init_lora, "a LoRA file is merged into base weights: pass --init-from BASE")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device", "cuda", "no CUDA device is visible; pass --device cpu")
    dims = initialize_parallel(config.parallel, device=device, seed=config.training.seed)
    global_batch = config.check_world(dims.data_parallel_size)
    if dims.is_logging_rank:
        ckpt.repair_checkpoints(run_dir)  # a replacement killed between its two renames
    if dist.is_initialized():
        dist.barrier()
    resume_path = ckpt.find_resume_checkpoint(resume, run_dir)
    changes: list[str] = []
    if resume_path is not None:
        meta = read_checkpoint_meta(resume_path)
        if meta["format"] != SHARDED_FORMAT:
            raise ConfigError("--resume", str(resume_path), "holds weights only (no optimizer state or step); "
                                                            "start a run from it with --init-from instead")
        ckpt.check_same_model(meta, config.model, resume_path)
        changes = ckpt.check_resume_config(meta, config, global_batch, resume_path)
        if lora and meta.get("lora"):
            from cogvx_mega.checkpoint.reader import check_lora_base

            check_lora_base(meta["lora"], config.model, str(resume_path))
            lora_base = {k: meta["lora"].get(k) for k in ("base", "base_fingerprint", "base_lora")}
    else:
        existing = ckpt.list_checkpoints(run_dir)
        if existing:
            raise ConfigError("--run-dir", run_dir, f"already holds checkpoints of a run (newest {existing[-1].name}); "
                                                    f"pass --resume auto to continue it, or use another --run-dir")
        if lora and init_from is None:
            raise ConfigError("finetune.lora_rank", config.finetune.lora_rank, "LoRA adapts pretrained weights: pass "
                                                                             "--init-from BASE (a diffusers folder or "
                                                                             "a checkpoint)")
        if init_from is not None:
            from cogvx_mega.checkpoint.reader import open_transformer_weights

            weights = open_transformer_weights(init_from)
            ckpt.check_same_model({"model": dataclasses.asdict(weights.model)}, config.model, init_from,
                                  ignore=ckpt.NOT_IN_THE_WEIGHTS)
            if init_lora is not None:
                from cogvx_mega.checkpoint.lora import deltas_from_diffusers_lora

                deltas_from_diffusers_lora(init_lora, config.model)  # a bad file fails here, before anything is written
            if lora:
                from cogvx_mega.checkpoint.reader import base_fingerprint

                lora_base = {"base": os.path.abspath(init_from), "base_fingerprint": base_fingerprint(init_from),
                             "base_lora": os.path.abspath(init_lora) if init_lora else None}
    dataset = open_training_data(config)
    sampler = None
    if config.training.sample_every:
        from cogvx_mega.tools.sample import training_sampler

        sampler = training_sampler(config)
    ckpt.check_shared_filesystem(run_dir)
    if dims.is_logging_rank:
        if resume_path is not None:
            moved = ckpt.abandon_newer_checkpoints(run_dir, int(meta["step"]))
            if moved is not None:
                logger.warning("resuming from step %d: the run's later checkpoints belong to another line now and "
                               "were moved to %s", int(meta["step"]), moved)
            if changes:
                logger.info("resume changes %s", "; ".join(changes))
        write_resolved_config(config, run_dir)
    chunks = build_model_chunks(config.model, config.parallel, device=device, seed=config.training.seed,
                                recompute=config.training.recompute,
                                recompute_num_layers=config.training.recompute_num_layers)
    if resume_path is None and init_from is not None:
        load_pretrained_weights(chunks, init_from, config.model, lora=init_lora)
        if dims.is_logging_rank:
            logger.info("initialised the weights from %s%s", init_from, f" with {init_lora} merged" if init_lora else "")
    elif lora_base is not None:  # a LoRA run resumes on its base; the checkpoint holds the adapters
        load_pretrained_weights(chunks, lora_base["base"], config.model, lora=lora_base["base_lora"])
    if lora:
        from cogvx_mega.model.lora import apply_lora

        adapted = apply_lora(chunks, config.finetune, config.training.seed)
        if dims.is_logging_rank:
            logger.info("LoRA rank %d on %d linears of this rank (%s); the base weights are frozen",
                        config.finetune.lora_rank, adapted, ", ".join(config.finetune.lora_targets))
    trainer = Trainer(config, dims, chunks, dataset, sampler=sampler)
    trainer.lora_base = lora_base
    if resume_path is not None:
        trainer.load(str(resume_path))
        if dims.is_logging_rank:
            logger.info("resumed from %s at step %d%s", resume_path, trainer.step,
                        " (--init-from ignored: the run has a checkpoint)" if init_from else "")
    try:
        return trainer.fit()
    finally:
        if hasattr(dataset, "close"):
            dataset.close()  # online mode's decode threads


def cmd_train(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if args.dry_run:
        from cogvx_mega.tools.plan import describe_layout

        world = args.world_size or int(os.environ.get("WORLD_SIZE", config.parallel.model_parallel_size))
        print(describe_layout(config, world))
        return 0
    run_training(config, resume=args.resume, init_from=args.init_from, init_lora=args.init_lora)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    """A training job for a cluster scheduler (tools/launch.py)."""
    from cogvx_mega.tools.launch import launch_slurm, train_arguments

    train_args = train_arguments(args)
    config = resolve_config(build_parser().parse_args(["train", *train_args]))
    result = launch_slurm(args, train_args, config)
    if args.dry_run:
        print(result, end="")
    else:
        print(f"submitted job {result}; log: {config.training.run_dir}/slurm/")
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    """Scaling-law experiments (tools/scaling.py)."""
    import json
    import shlex
    from pathlib import Path

    from cogvx_mega.config.schema import ConfigError
    from cogvx_mega.tools import scaling

    if args.action == "fit" and args.table:
        rows = scaling.read_table(args.table)
        out = Path(args.out or Path(args.table).with_suffix("")).resolve()
    else:
        if not args.spec:
            raise ConfigError("SPEC", None, f"`cogvx scaling {args.action}` needs the spec file")
        spec = scaling.read_spec(args.spec)
        runs = scaling.plan_runs(spec)
        if args.action == "plan":
            print(scaling.describe_plan(runs))
            return 0
        if args.action == "run":
            slurm = shlex.split(args.slurm) if args.slurm else None
            scaling.run_all(spec, runs, nproc_per_node=args.nproc_per_node, slurm=slurm)
            return 0
        rows = []
        for run in runs:
            loss = scaling.final_loss(run, spec.final_window)
            if loss is None:
                logger.warning("%s is not finished: left out of the fit", run.name)
            else:
                rows.append((float(run.params), float(run.tokens), loss))
        out = Path(args.out or Path(spec.run_root) / "fit")
    fit = scaling.fit_scaling_law(rows)
    written = scaling.write_fit(rows, fit, out)
    if args.json:
        print(json.dumps(fit))
    else:
        print(" ".join(f"{name}={fit[name]:.4g}" for name in scaling.FIT_NAMES))
        print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """The layouts that fit a GPU budget, fastest first (tools/plan.py)."""
    import json

    from cogvx_mega.config import load_config
    from cogvx_mega.config.schema import ConfigError
    from cogvx_mega.config.schema import parse_size
    from cogvx_mega.tools.plan import describe_plans, plan_layouts

    height, width = parse_size("--size", args.size)
    for flag, value in (("--gpus", args.gpus), ("--gpus-per-node", args.gpus_per_node),
                        ("--global-batch", args.global_batch)):
        if value < 1:
            raise ConfigError(flag, value, "use a positive number")
    if not args.gpu_mem > 0:
        raise ConfigError("--gpu-mem", args.gpu_mem, "give the GPU memory in GiB, e.g. 80")
    config = load_config(args.preset, overrides=[
        f"data.num_frames={args.frames}", f"data.height={height}", f"data.width={width}", "data.buckets=null",
        "training.device=cuda", "training.micro_batch_size=1", f"training.global_batch_size={args.global_batch}",
        *args.overrides])
    plans, considered = plan_layouts(config, args.gpus, args.gpu_mem, args.gpus_per_node, fp8=args.fp8)
    if args.json:
        print(json.dumps({"considered": considered, "layouts": [plan.as_dict() for plan in plans]}))
    else:
        print(describe_plans(plans, considered, limit=args.top))
    if not plans:
        raise ConfigError("--gpus", args.gpus, f"no layout of {args.gpus} GPUs fits {args.gpu_mem:g} GiB at "
                                               f"{args.frames} frames {args.size}; add GPUs or lower the resolution")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cogvx_mega.demo import run_demo

    run_demo(run_dir=args.run_dir, steps=args.steps)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from cogvx_mega.config.schema import ConfigError

    if not os.path.exists(args.source):
        raise ConfigError("SOURCE", args.source, "no such file or folder")
    if os.path.exists(args.destination) and not args.overwrite:
        raise ConfigError("DESTINATION", args.destination, "already exists; pass --overwrite or another path")
    if args.direction.startswith("vae-"):
        from cogvx_mega.tools.convert_vae import convert_vae

        convert_vae(args.direction, args.source, args.destination, preset=args.preset)
    else:
        from cogvx_mega.tools.convert_transformer import convert_transformer

        convert_transformer(args.direction, args.source, args.destination, preset=args.preset,
                            config_file=args.config_file, overrides=args.overrides)
    print(f"wrote {args.destination}")
    return 0


def cmd_vae(args: argparse.Namespace) -> int:
    """Encode a video file to a latent file or back; context parallel over all ranks under torchrun."""
    import torch

    from cogvx_mega.api import load_vae
    from cogvx_mega.config.schema import ConfigError
    from cogvx_mega.vae import io

    if os.path.exists(args.output) and not args.overwrite:
        raise ConfigError("OUTPUT", args.output, "already exists; pass --overwrite or another path")
    if args.chunk_frames is not None and args.chunk_frames < 1:
        raise ConfigError("--chunk-frames", args.chunk_frames, "use a positive number of latent frames")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    group = _vae_process_group(device)
    if group is not None and args.chunk_frames is not None:
        raise ConfigError("--chunk-frames", args.chunk_frames, "chunked mode is for one process; under torchrun "
                                                               "time is split over the ranks instead")
    vae = load_vae(args.vae, device=device)
    is_writer = group is None or torch.distributed.get_rank() == 0
    with torch.no_grad():
        if args.action == "encode":
            video, fps = io.read_video(args.input, args.frames)
            latents = vae.encode(video.to(device), sample=args.sample, chunk_frames=args.chunk_frames,
                                 group=group, gather=True,
                                 generator=torch.Generator(device).manual_seed(args.seed) if args.sample else None)
            if is_writer:
                io.save_latents(args.output, latents, {"fps": fps, "frames": video.shape[2],
                                                       "scaling_factor": vae.config.scaling_factor,
                                                       "scaled": False, "vae": os.path.abspath(args.vae)})
        else:
            latents, metadata = io.load_latents(args.input)
            video = vae.decode(latents.to(device=device, dtype=torch.float32), chunk_frames=args.chunk_frames,
                               group=group, gather=True)
            if is_writer:
                io.write_video(args.output, video.cpu(), fps=args.fps or metadata.get("fps", 8.0))
    if is_writer:
        print(f"wrote {args.output}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """`cogvx data scan DIR --output manifest.jsonl`: probe every media file, write the usable clips."""
    from pathlib import Path

    from cogvx_mega.config.schema import ConfigError
    from cogvx_mega.data.manifest import find_media, read_captions, scan, write_manifest

    root = Path(args.source)
    if not root.is_dir():
        raise ConfigError("DIR", args.source, "no such folder; pass the folder that holds the videos and images")
    if os.path.exists(args.output) and not args.overwrite:
        raise ConfigError("--output", args.output, "already exists; pass --overwrite or another path")
    captions = read_captions(args.captions, root) if args.captions else {}
    paths = find_media(root)
    records, failures = scan(paths, captions, workers=args.workers)
    for failure in failures:
        print(f"skipped {failure.path}: {failure.reason}", file=sys.stderr)
    if not records:
        raise ConfigError("DIR", args.source, f"none of its {len(paths)} media files is usable (see the lines above); "
                                             f"nothing written")
    write_manifest(records, args.output)
    videos = sum(record.kind == "video" for record in records)
    print(f"scanned {len(paths)} files: {len(records)} clips ({videos} videos, {len(records) - videos} images) "
          f"written to {args.output}, {len(failures)} skipped")
    return 0


def cmd_data_encode(args: argparse.Namespace) -> int:
    """`cogvx data encode`: manifest -> decode -> VAE moments + T5 embeddings -> a zarr latent cache; every
    rank under torchrun takes its share of the shards, and a restarted encode resumes."""
    from cogvx_mega.tools.data_encode import encode_manifest

    encode_manifest(resolve_config(args), args.manifest, args.vae, args.text_encoder, args.output,
                    shard_clips=args.shard_clips, device=args.device, overwrite=args.overwrite)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """A video from a checkpoint (tools/sample.py)."""
    from cogvx_mega.tools.sample import run_sample

    for path in run_sample(args):
        print(f"wrote {path}")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """`cogvx checkpoint verify DIR` (exit 0: intact, 1: damaged, the bad file named) and `cogvx checkpoint list
    RUN_DIR` (each checkpoint's step, layout, size and state from its recorded sizes)."""
    import time
    from pathlib import Path

    from cogvx_mega.checkpoint.verify import describe, folder_bytes, verify_checkpoint, verify_files
    from cogvx_mega.config.schema import ConfigError

    path = Path(args.path)
    if args.action == "verify":
        if not path.is_dir():
            raise ConfigError("DIR", args.path, "no such folder; pass a checkpoint folder (checkpoints/step_*)")
        started = time.perf_counter()
        verdict = verify_checkpoint(path)
        seconds = time.perf_counter() - started
        if not verdict.ok:
            for problem in verdict.problems:
                print(f"{path}: damaged: {problem}")
            return 1
        if not verdict.recorded:
            print(f"{path}: unverified: its metadata is readable but it lists no files (written before checkpoints "
                  f"recorded them)")
            return 0
        print(f"{path}: ok: {verdict.files} files, {verdict.bytes / 1e6:,.1f} MB, sizes and CRC32C checked in "
              f"{seconds:.2f} s")
        return 0
    from cogvx_mega.training.checkpoint import checkpoints_folder

    root = checkpoints_folder(path)
    if not root.is_dir():
        raise ConfigError("RUN_DIR", args.path, "holds no checkpoints/ folder; pass a run folder (--run-dir)")
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name.startswith("abandoned-after-"):  # a line left by resuming an older checkpoint
            inner = sorted(p.name for p in folder.iterdir() if p.is_dir())
            rows.append((folder.name, "", "", "", f"abandoned line: {', '.join(inner)}"))
            continue
        verdict = verify_files(folder, checksum_share=(0, 1) if args.checksums else None)
        step, layout = describe(verdict.meta)
        state = verdict.state
        if folder.name.startswith("damaged-"):
            state = "set aside by a resume (damaged)"
        rows.append((folder.name, step, layout, f"{folder_bytes(folder) / 1e6:,.1f} MB", state))
    if not rows:
        print(f"{root}: no checkpoints")
        return 0
    widths = [max(len(str(row[i])) for row in rows + [("folder", "step", "layout", "size", "state")])
              for i in range(5)]
    for row in [("folder", "step", "layout", "size", "state"), *rows]:
        print("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip())
    if not args.checksums:
        print("(sizes only: --checksums, or `cogvx checkpoint verify DIR`, also compares every CRC32C)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A complete diffusers pipeline folder, or a LoRA's diffusers adapters, from a checkpoint (tools/export.py)."""
    from cogvx_mega.config.schema import ConfigError

    if args.format == "lora":
        from cogvx_mega.tools.export import export_lora

        print(f"wrote {export_lora(args.ckpt, args.out, args.overwrite)}")
        return 0
    from cogvx_mega.tools.export import export_diffusers

    for flag, value in (("--vae", args.vae), ("--text-encoder", args.text_encoder)):
        if not value:
            raise ConfigError(flag, value, "`cogvx export diffusers` writes a whole pipeline and needs it")
    print(f"wrote {export_diffusers(args.ckpt, args.vae, args.text_encoder, args.out, args.dtype, args.overwrite)}")
    return 0


def _vae_process_group(device: str):
    """The world group when launched by torchrun with more than one rank (all ranks split time)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    from cogvx_mega.parallel.state import init_torch_distributed

    init_torch_distributed(device)
    return dist.group.WORLD


def quiet_libraries() -> None:
    """Keep megatron's import-time and construction-time notices (no Transformer Engine, no Apex, deprecated
    config scopes) out of the command's output; `-v` shows them. Errors still come through."""
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", module=r"transformer_engine(\.|$)")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled, unavailable or uninitialized")
    warnings.filterwarnings("ignore", message=r".*deprecating ShardedTensor")  # megatron's loads still use it
    logging.getLogger("megatron").setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogvx", description="CogVideoX training on megatron-core")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    verbose_too = argparse.ArgumentParser(add_help=False)  # `-v` also after the subcommand
    verbose_too.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="debug logging and library notices")

    train = sub.add_parser("train", parents=[verbose_too], help="train (single process or under torchrun)")
    _add_config_arguments(train)
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", parents=[verbose_too],
                          help="train the tiny preset on generated data on CPU, convert, plot")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--steps", type=int, default=300)
    demo.set_defaults(func=cmd_demo)

    convert = sub.add_parser("convert", parents=[verbose_too],
                             help="convert checkpoints between diffusers, SAT and cogvx-mega")
    convert.add_argument("direction", choices=("diffusers-to-project", "project-to-diffusers", "sat-to-project",
                                               "vae-diffusers-to-project", "vae-project-to-diffusers",
                                               "vae-sat-to-project"))
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument("--overwrite", action="store_true")
    _add_config_arguments(convert, with_training=False)
    convert.set_defaults(func=cmd_convert)

    data = sub.add_parser("data", parents=[verbose_too], help="prepare training data: scan media into a manifest")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    scan = data_sub.add_parser("scan", parents=[verbose_too], help="probe every video and image under DIR")
    scan.add_argument("source", metavar="DIR")
    scan.add_argument("--output", required=True, help="the manifest to write (JSONL, one clip a line)")
    scan.add_argument("--captions", help="JSONL or CSV of (path, caption); otherwise a sidecar .txt per file")
    scan.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="parallel probes")
    scan.add_argument("--overwrite", action="store_true")
    scan.set_defaults(func=cmd_data)
    encode = data_sub.add_parser("encode", parents=[verbose_too],
                                 help="decode, VAE-encode and T5-encode a manifest into a zarr latent cache")
    encode.add_argument("--manifest", required=True)
    encode.add_argument("--vae", required=True, help="diffusers AutoencoderKLCogVideoX folder or cogvx-mega VAE")
    encode.add_argument("--text-encoder", required=True, help="local T5 folder (or a pipeline folder)")
    encode.add_argument("--output", required=True, help="the zarr store (an interrupted one resumes)")
    encode.add_argument("--shard-clips", type=int, default=16, help="clips per committed shard")
    encode.add_argument("--device", choices=("cpu", "cuda"), default=None)
    encode.add_argument("--overwrite", action="store_true")
    _add_config_arguments(encode, with_training=False)
    encode.set_defaults(func=cmd_data_encode)

    vae = sub.add_parser("vae", parents=[verbose_too],
                         help="encode a video to latents or decode latents to a video with the 3D VAE")
    vae.add_argument("action", choices=("encode", "decode"))
    vae.add_argument("input", help="encode: a video file; decode: a latent file (.safetensors)")
    vae.add_argument("output", help="encode: the latent file to write; decode: the video file (.mp4)")
    vae.add_argument("--vae", required=True, help="diffusers AutoencoderKLCogVideoX folder or cogvx-mega VAE checkpoint")
    vae.add_argument("--frames", type=int, default=None, help="encode only the first N frames (N = 1 + 4k)")
    vae.add_argument("--sample", action="store_true", help="draw from the posterior instead of its mean")
    vae.add_argument("--seed", type=int, default=0)
    vae.add_argument("--chunk-frames", type=int, default=None,
                     help="one process: walk time N latent frames at a time (long clips on one GPU)")
    vae.add_argument("--fps", type=float, default=None)
    vae.add_argument("--device", choices=("cpu", "cuda"), default=None)
    vae.add_argument("--overwrite", action="store_true")
    vae.set_defaults(func=cmd_vae)
    from cogvx_mega.tools.launch import add_launch_arguments
    from cogvx_mega.tools.sample import add_sample_arguments

    sample = sub.add_parser("sample", parents=[verbose_too], help="make a video with a checkpoint (DDIM / DPM-Solver++, "
                                                                 "classifier-free guidance)")
    add_sample_arguments(sample)
    sample.set_defaults(func=cmd_sample)
    export = sub.add_parser("export", parents=[verbose_too], help="write a release: a diffusers pipeline folder "
                                                                  "(diffusers), or a LoRA's adapters (lora)")
    export.add_argument("format", choices=("diffusers", "lora"))
    export.add_argument("--ckpt", required=True, help="a cogvx-mega checkpoint (any layout) or a diffusers folder")
    export.add_argument("--vae", help="diffusers: AutoencoderKLCogVideoX folder or cogvx-mega VAE")
    export.add_argument("--text-encoder", help="diffusers: local T5 folder (tokenizer and encoder)")
    export.add_argument("--out", required=True, help="the pipeline folder to write")
    export.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(func=cmd_export)
    checkpoint = sub.add_parser("checkpoint", parents=[verbose_too], help="check checkpoints: verify one (sizes "
                                                                          "and CRC32C of every file) or list a run's")
    checkpoint.add_argument("action", choices=("verify", "list"))
    checkpoint.add_argument("path", metavar="DIR", help="verify: a checkpoint folder; list: a run folder")
    checkpoint.add_argument("--checksums", action="store_true", help="list: compare every file's CRC32C too "
                                                                     "(reads every checkpoint whole)")
    checkpoint.set_defaults(func=cmd_checkpoint)
    from cogvx_mega.tools.scaling import add_scaling_arguments

    plan = sub.add_parser("plan", parents=[verbose_too], help="the TP/PP/VPP/CP/DP/recompute layouts that fit a "
                                                              "GPU budget, ranked by predicted step time")
    plan.add_argument("--preset", required=True)
    plan.add_argument("--gpus", type=int, required=True)
    plan.add_argument("--gpu-mem", type=float, required=True, help="GiB per GPU")
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--frames", type=int, default=49)
    plan.add_argument("--size", default="480x720", help="HEIGHTxWIDTH in pixels")
    plan.add_argument("--global-batch", type=int, default=64)
    plan.add_argument("--fp8", action="store_true")
    plan.add_argument("--top", type=int, default=20, help="rows to print")
    plan.add_argument("--json", action="store_true")
    plan.add_argument("overrides", nargs="*", metavar="section.field=value")
    plan.set_defaults(func=cmd_plan)

    scaling = sub.add_parser("scaling", parents=[verbose_too], help="scaling-law experiments: plan, run and fit a "
                                                                    "sweep of model sizes and token budgets")
    add_scaling_arguments(scaling)
    scaling.set_defaults(func=cmd_scaling)
    launch = sub.add_parser("launch", parents=[verbose_too], help="run training as a cluster job")
    launch_sub = launch.add_subparsers(dest="launcher", required=True)
    slurm = launch_sub.add_parser("slurm", parents=[verbose_too],
                                  help="an sbatch job (srun + torchrun) that requeues itself at the time limit")
    add_launch_arguments(slurm)
    slurm.set_defaults(func=cmd_launch)
    return parser


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (a handler made in an earlier main() of the same process, e.g. a
    notebook or a test, must not write to a stream that has since been replaced or closed)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    from cogvx_mega.checkpoint.meta import ConversionError
    from cogvx_mega.config.schema import ConfigError
    from cogvx_mega.data.manifest import MediaError
    from cogvx_mega.training import TrainingDiverged
    from cogvx_mega.vae.time_split import VAEInputError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `section.field=value` overrides may follow options too (argparse stops collecting positionals there)
    stray = [token for token in extra if token.startswith("-") or "=" not in token]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if not args.verbose:
        quiet_libraries()
    # Configure our own logger; other libraries keep theirs (megatron's is only quietened, above).
    for previous in [h for h in logger.handlers if getattr(h, "_cogvx_cli", False)]:
        logger.removeHandler(previous)  # main() called again in one process (tests, notebooks)
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._cogvx_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logger.propagate = False
    try:
        return args.func(args)
    except (ConfigError, ConversionError, FileNotFoundError, VAEInputError, MediaError) as error:
        print(f"cogvx: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as error:
        print(f"cogvx: error: {error}", file=sys.stderr)
        return EXIT_DIVERGED


if __name__ == "__main__":
    sys.exit(main())
