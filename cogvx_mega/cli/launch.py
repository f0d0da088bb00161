"""`cogvx launch slurm ... -- TRAIN_ARGS`: a training run as a SLURM batch job that requeues itself at its time
limit or after a failure; `cogvx launch node`: one node's part of such a job (tools/launch.py)."""
from __future__ import annotations

import argparse

from cogvx_mega.cli.arguments import verbose_parent

NAME = "launch"
HELP = "run training as a cluster job"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    launchers = parser.add_subparsers(dest="launcher", required=True)
    slurm = launchers.add_parser("slurm", parents=[verbose_parent()],
                                 help="an sbatch job (srun + torchrun) that requeues itself at the time limit")
    add_slurm_arguments(slurm)
    node = launchers.add_parser("node", parents=[verbose_parent()],
                                help="one node of a multi-node job: its network route, then its torchrun (the "
                                     "sbatch script runs this once per node)")
    add_node_arguments(node)


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True,
                        help="ranks per node (GPUs; with training.device=cpu, processes)")
    parser.add_argument("--partition")
    parser.add_argument("--time", help="SLURM time limit, e.g. 04:00:00")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--job-name")
    parser.add_argument("--signal-seconds", type=int, default=300,
                        help="checkpoint and requeue this long before the time limit")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="requeue a run that failed (a hang the watchdog ended, a lost peer) at most this often")
    parser.add_argument("--env", action="append", metavar="NAME=VALUE", help="extra environment for the job")
    parser.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    parser.add_argument("train_args", nargs="...", help="-- then the `cogvx train` arguments")


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nnodes", type=int, required=True)
    parser.add_argument("--nproc-per-node", type=int, required=True)
    parser.add_argument("--rdzv-endpoint", required=True, help="HOST:PORT of the c10d rendezvous (the first node)")
    parser.add_argument("--rdzv-id", required=True, help="the same on every node (the job id)")
    parser.add_argument("train_args", nargs="...", help="-- then the `cogvx train` arguments")


def run(args: argparse.Namespace) -> int:
    from cogvx_mega.cli import train
    from cogvx_mega.cli.arguments import parse_with_overrides, resolve_config
    from cogvx_mega.tools.launch import launch_node, launch_slurm, train_arguments

    train_args = train_arguments(args)
    if args.launcher == "node":
        launch_node(args, train_args)  # replaces this process
        return 0
    train_parser = argparse.ArgumentParser(prog="cogvx train")
    train.add_arguments(train_parser)
    config = resolve_config(parse_with_overrides(train_parser, train_args))
    result = launch_slurm(args, train_args, config)
    if args.dry_run:
        print(result, end="")
    else:
        print(f"submitted job {result}; log: {config.training.run_dir}/slurm/")
    return 0
