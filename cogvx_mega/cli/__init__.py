"""The `cogvx` command: `main` (logging, errors, exit codes) and one module per command, each with
`add_arguments(parser)` and `run(args)`.

    cogvx train --preset tiny --data synthetic --steps 100 --run-dir runs/x [section.field=value ...]
    cogvx train ... --resume auto|CKPT       continue a run (model, optimizer, step) at any layout
    cogvx train ... --init-from PATH        start from weights (diffusers folder or cogvx-mega checkpoint)
    cogvx train ... finetune.lora_rank=R --init-from BASE [--init-lora DIR]    LoRA fine-tuning
    cogvx demo [--run-dir runs/demo] [--steps 300]
    cogvx convert diffusers-to-project | project-to-diffusers | sat-to-project SRC DST [--preset NAME]
    cogvx convert vae-diffusers-to-project | vae-project-to-diffusers | vae-sat-to-project SRC DST
    cogvx data scan DIR --output manifest.jsonl [--captions FILE] [--workers N]
    cogvx data encode --manifest M --vae VAE --text-encoder T5 --output cache.zarr
    cogvx vae encode VIDEO LATENTS --vae PATH [--frames N] [--sample] [--chunk-frames N]
    cogvx vae decode LATENTS VIDEO --vae PATH [--chunk-frames N] [--fps F]
    cogvx sample --ckpt CKPT --vae VAE (--prompt TEXT --text-encoder T5 | --prompt-embeds FILE) [--image IMG]
                 --output out.mp4
    cogvx export diffusers --ckpt CKPT --vae VAE --text-encoder T5 --out DIR | lora --ckpt LORA_CKPT --out DIR
    cogvx checkpoint verify CKPT | list RUN_DIR
    cogvx config show [--preset P] [--config FILE] [--run-dir DIR] [section.field=value ...]
    cogvx plan --preset P --gpus N --gpu-mem GiB [--frames F --size HxW --fp8 --json]
    cogvx scaling plan|run|fit SPEC [--table runs.csv] [--json]
    cogvx launch slurm --nodes N --gpus-per-node G [--partition P --time T ...] [--dry-run] -- TRAIN_ARGS

Under torchrun, `train`, `sample`, `data encode` and `vae` run on every rank (`torchrun ... -m cogvx_mega.cli`).
Errors a user can cause print one line, `cogvx: error: ...`, and exit with status 2 before anything is written;
the machine's faults (OSError: a full disk, permissions) one line and status 1; `train` stopped by a signal after
its checkpoint 128 + the signal.
"""
from cogvx_mega.cli.main import EXIT_DIVERGED, EXIT_USER_ERROR, build_parser, main

__all__ = ["EXIT_DIVERGED", "EXIT_USER_ERROR", "build_parser", "main"]
