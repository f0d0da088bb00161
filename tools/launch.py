"""`cogvx launch slurm`: a training run as a SLURM batch job that requeues itself at its time limit.

    cogvx launch slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 04:00:00 -- \\
        --config examples/configs/cogvideox-5b-8xh100.yaml --data cache.zarr --run-dir /shared/runs/5b

The script runs one task per node (`srun`), each a `torchrun` of the node's ranks with the c10d rendezvous on
the job's first node. SLURM signals the batch shell `--signal-seconds` before the time limit (`--signal
B:USR1@S`); the shell asks the run to stop (it creates the run's training.stop_file), every rank stops at the
next step boundary after a checkpoint, and the shell requeues the job (`scontrol requeue`), which continues
with `--resume auto`. A preempted job (SLURM's PreemptMode=REQUEUE) comes back the same way from its last
periodic checkpoint. Everything is checked before anything is written: the layout must fit nodes x GPUs, and
without `--dry-run` the run dir must be writable and sbatch on PATH.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from cogvx_mega.config.errors import ConfigError, check_writable

STOP_FILE_NAME = ".stop-requested"
# NCCL and torch settings for multi-node runs (each a fact of the libraries, overridable with --env)
DEFAULT_ENV = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # megatron's TP/SP communication overlap needs in-order kernel queues
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed collective ends the job instead of hanging it
    "NCCL_DEBUG": "WARN",
    "PYTHONUNBUFFERED": "1",  # the job log shows progress as it happens
}


@dataclasses.dataclass
class SlurmJob:
    nodes: int
    gpus_per_node: int
    train_args: list[str]
    run_dir: str
    device: str = "cuda"
    job_name: str = "cogvx"
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    cpus_per_task: Optional[int] = None
    signal_seconds: int = 300
    env: dict = dataclasses.field(default_factory=dict)
    python: str = sys.executable

    @property
    def script_path(self) -> Path:
        return Path(self.run_dir) / "slurm" / f"{self.job_name}.sbatch"

    @property
    def log_pattern(self) -> str:
        return str(Path(self.run_dir) / "slurm" / f"{self.job_name}-%j.out")


def render_sbatch(job: SlurmJob) -> str:
    """The batch script of `job` (see the module docstring)."""
    q = shlex.quote
    lines = ["#!/bin/bash", "# A cogvx-mega training job written by `cogvx launch slurm`; it requeues itself at the "
             "time limit.", f"#SBATCH --job-name={job.job_name}", f"#SBATCH --nodes={job.nodes}",
             "#SBATCH --ntasks-per-node=1"]
    if job.device == "cuda":
        lines += [f"#SBATCH --gpus-per-node={job.gpus_per_node}", "#SBATCH --exclusive"]
    for flag, value in (("cpus-per-task", job.cpus_per_task), ("time", job.time), ("partition", job.partition),
                        ("account", job.account), ("qos", job.qos)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH --output={job.log_pattern}", "#SBATCH --open-mode=append", "#SBATCH --requeue",
              f"#SBATCH --signal=B:USR1@{job.signal_seconds}", ""]
    env = {**DEFAULT_ENV, **job.env}
    if job.cpus_per_task:
        env.setdefault("OMP_NUM_THREADS", str(max(1, job.cpus_per_task // job.gpus_per_node)))
    lines += ["set -uo pipefail", f"STOP_FILE={q(str(Path(job.run_dir) / STOP_FILE_NAME))}", 'rm -f "$STOP_FILE"',
              'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
              'export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"']
    lines += [f"export {name}={q(str(value))}" for name, value in env.items()]
    train = [job.python, "-m", "torch.distributed.run", "--nnodes", "$SLURM_NNODES", "--nproc-per-node",
             str(job.gpus_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", "$MASTER_ADDR:$MASTER_PORT",
             "--rdzv-id", "$SLURM_JOB_ID", "-m", "cogvx_mega.cli", "train", *job.train_args]
    command = " ".join(part if part.startswith("$") else q(part) for part in train)
    lines += ["",
              "requeue=0",
              'on_time_limit() { echo "cogvx: time limit near: checkpoint, then requeue"; requeue=1; '
              'touch "$STOP_FILE"; }',
              "trap on_time_limit USR1",
              'echo "cogvx: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, '
              'rendezvous $MASTER_ADDR:$MASTER_PORT"',
              f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 {command} &",
              "pid=$!",
              "while true; do  # a trapped signal interrupts wait; the step goes on",
              '  wait "$pid"; status=$?',
              '  kill -0 "$pid" 2>/dev/null || break',
              "done",
              '# the run removes the stop file when it stopped on it; a file still there was never seen (it finished)',
              'if [ "$requeue" = 1 ] && [ "$status" = 0 ] && [ ! -e "$STOP_FILE" ]; then',
              '  echo "cogvx: requeue job $SLURM_JOB_ID"',
              '  scontrol requeue "$SLURM_JOB_ID"',
              "fi",
              'rm -f "$STOP_FILE"',
              'exit "$status"', ""]
    return "\n".join(lines)


def train_arguments(args) -> list[str]:
    """The `cogvx train` arguments after `--` (checked)."""
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    if not train_args:
        raise ConfigError("--", None, "put the `cogvx train` arguments after --, e.g. -- --preset tiny --data cache.zarr")
    for flag in ("--dry-run", "--world-size"):
        if flag in train_args:
            raise ConfigError(flag, None, "is not a training argument for a job; use `cogvx launch slurm --dry-run`")
    return train_args


def plan_slurm_job(args, train_args: list[str], config) -> SlurmJob:
    """The job of `cogvx launch slurm ARGS -- TRAIN_ARGS` (`config`: what TRAIN_ARGS resolve to), every check
    done; nothing is written."""
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", getattr(args, name), "use a positive number")
    if args.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", args.time):
        raise ConfigError("--time", args.time, "write SLURM's time format, e.g. 04:00:00 or 1-00:00:00")
    if args.signal_seconds < 30:
        raise ConfigError("--signal-seconds", args.signal_seconds, "leave at least 30 s for the checkpoint")
    env = {}
    for item in args.env or []:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError("--env", item, "write NAME=VALUE")
        env[name] = value
    world = args.nodes * args.gpus_per_node
    layout = config.parallel.model_parallel_size
    if world % layout:
        raise ConfigError("--nodes", args.nodes, f"{args.nodes} node(s) x {args.gpus_per_node} GPUs = {world} ranks; "
                                                 f"the layout (TP x PP x CP = {layout}) needs a multiple of {layout}")
    config.check_world(config.parallel.data_parallel_size(world))
    run_dir = os.path.abspath(config.training.run_dir)
    train_args = [*_without(train_args, "--run-dir"), "--run-dir", run_dir,
                  f"training.stop_file={os.path.join(run_dir, STOP_FILE_NAME)}"]
    if "--resume" not in train_args:
        train_args += ["--resume", "auto"]  # the first run starts fresh; a requeued one continues
    name = args.job_name or f"cogvx-{Path(run_dir).name}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError("--job-name", name, "use letters, digits, '.', '_' and '-'")
    return SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, train_args=train_args, run_dir=run_dir,
                    device=config.training.device, job_name=name, partition=args.partition, time=args.time,
                    account=args.account, qos=args.qos, cpus_per_task=args.cpus_per_task,
                    signal_seconds=args.signal_seconds, env=env)


def _without(args: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for index, token in enumerate(args):
        if skip:
            skip = False
            continue
        if token == flag:
            skip = True
            continue
        if token.startswith(flag + "="):
            continue
        out.append(token)
    return out


def check_job_outputs(job: SlurmJob) -> None:
    """What a submitted job writes can be written: the run dir (the training run's), its slurm/ folder (the
    script and the job's logs) and the script itself, each of the right kind and in a folder that takes new files.
    Checked here, where the script is written (the run dir is shared with the nodes)."""
    check_writable("--run-dir", job.run_dir, folder=True)
    check_writable("--run-dir", job.script_path.parent, folder=True)
    check_writable("--run-dir", job.script_path)


def launch_slurm(args, train_args: list[str], config) -> str:
    """Print (--dry-run) or write and submit the job; returns the script, or the job id."""
    job = plan_slurm_job(args, train_args, config)
    script = render_sbatch(job)
    if args.dry_run:
        return script
    check_job_outputs(job)
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("sbatch", None, "is not on PATH: launch from a SLURM login node, or pass --dry-run to "
                                          "print the script")
    path = job.script_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(script)
    os.replace(tmp, path)
    result = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        path.unlink(missing_ok=True)
        message = (result.stderr or result.stdout).strip().splitlines()
        raise ConfigError("sbatch", str(path), f"refused the job: {message[-1] if message else result.returncode}")
    return result.stdout.strip().split(";")[0]
