"""`cogvx launch slurm`: a training run as a SLURM batch job that requeues itself at its time limit.

    cogvx launch slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 04:00:00 -- \\
        --config examples/configs/cogvideox-5b-8xh100.yaml --data cache.zarr --run-dir /shared/runs/5b

The script runs one task per node (`srun`), each `cogvx launch node`: it finds the node's address and network
interface on its route to the rendezvous host (the first node's `NodeAddr` from SLURM, so node names need not
resolve), sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to that interface (unless `--env` sets them) and runs a
`torchrun` of the node's ranks with the c10d rendezvous on the first node. SLURM signals the batch shell
`--signal-seconds` before the time limit (`--signal B:USR1@S`); the shell asks the run to stop (it creates the
run's training.stop_file), every rank stops at the next step boundary after a checkpoint, and the shell requeues
the job (`scontrol requeue`), which continues with `--resume auto`. A preempted job (SLURM's PreemptMode=REQUEUE)
comes back the same way from its last periodic checkpoint, and a job that loses a node is requeued by SLURM
(`--requeue`). A run that fails (a rank's `training.hang_timeout_s` watchdog fired, a peer died) makes the script
requeue the job, at most `--max-failures` times per job. Everything is checked before anything is written: the
layout must fit nodes x GPUs, and without `--dry-run` the run dir must be writable and sbatch on PATH.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import socket
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
    max_failures: int = 3
    env: dict = dataclasses.field(default_factory=dict)
    python: str = sys.executable

    @property
    def script_path(self) -> Path:
        return Path(self.run_dir) / "slurm" / f"{self.job_name}.sbatch"

    @property
    def log_pattern(self) -> str:
        return str(Path(self.run_dir) / "slurm" / f"{self.job_name}-%j.out")

    @property
    def failures_path(self) -> str:
        """How many times the job's run failed (the script counts them across requeues; `%j` is the job id)."""
        return str(Path(self.run_dir) / "slurm" / f"{self.job_name}-%j.failures")


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
              f'FAILURES_FILE={q(job.failures_path).replace("%j", "$SLURM_JOB_ID")}',
              "# the rendezvous host: the first node's NodeAddr (slurmctld reaches it there; its name may not "
              "resolve)",
              'first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
              'MASTER_ADDR="$(scontrol -o show node "$first_node" | tr " " "\\n" | sed -n "s/^NodeAddr=//p")"',
              'export MASTER_ADDR="${MASTER_ADDR:-$first_node}"',
              "# a port for each start: a job requeued and started again at once on the same nodes never meets the",
              "# last start's rendezvous store or its sockets still closing",
              'export MASTER_PORT="$((20000 + (SLURM_JOB_ID * 10 + ${SLURM_RESTART_COUNT:-0} % 10) % 20000))"']
    lines += [f"export {name}={q(str(value))}" for name, value in env.items()]
    node = [job.python, "-m", "cogvx_mega.cli", "launch", "node", "--nnodes", "$SLURM_NNODES", "--nproc-per-node",
            str(job.gpus_per_node), "--rdzv-endpoint", "$MASTER_ADDR:$MASTER_PORT", "--rdzv-id", "$SLURM_JOB_ID",
            "--", *job.train_args]
    command = " ".join(f'"{part}"' if part.startswith("$") else q(part) for part in node)
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
              '  rm -f "$STOP_FILE"',
              '  scontrol requeue "$SLURM_JOB_ID"',
              'elif [ "$status" != 0 ]; then  # a hang the watchdog ended, a lost peer: resume from the checkpoint',
              '  failures=$(( $(cat "$FAILURES_FILE" 2>/dev/null || echo 0) + 1 ))',
              '  echo "$failures" > "$FAILURES_FILE"',
              f'  if [ "$failures" -le {job.max_failures} ]; then',
              '    echo "cogvx: the run failed (exit $status): requeue job $SLURM_JOB_ID (failure $failures of at most '
              f'{job.max_failures})"',
              '    rm -f "$STOP_FILE"',
              '    scontrol requeue "$SLURM_JOB_ID"',
              "  else",
              f'    echo "cogvx: the run failed (exit $status) {job.max_failures + 1} times; not requeued: see the log '
              'above"',
              "  fi",
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
    if args.max_failures < 0:
        raise ConfigError("--max-failures", args.max_failures, "use 0 (never requeue a failed run) or more")
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
                    signal_seconds=args.signal_seconds, max_failures=args.max_failures, env=env)


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


@dataclasses.dataclass(frozen=True)
class NodeRoute:
    """How this node reaches the rendezvous host."""
    address: str  # this node's source address on the route
    interface: str  # the network interface holding that address (gloo's and NCCL's socket interface)
    is_host: bool  # the rendezvous host is this node: its torchrun hosts the c10d store


def route_to(host: str, port: int, nnodes: int) -> NodeRoute:
    """The route from this node to the rendezvous `host`: a UDP socket's connect sends nothing, the kernel picks
    the route and its source address, and the interface is the one that holds that address."""
    import ipaddress

    import psutil

    endpoint = f"{host}:{port}"
    try:
        family, _, _, _, target = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise ConfigError("--rdzv-endpoint", endpoint, f"does not resolve on this node ({error.strerror}): give the "
                                                       "first node's NodeAddr in slurm.conf, or an address") from None
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(target)
        except OSError as error:
            raise ConfigError("--rdzv-endpoint", endpoint, f"no route from this node ({error.strerror})") from None
        address = probe.getsockname()[0]
    interfaces = psutil.net_if_addrs()
    local = {entry.address.split("%")[0]: name for name, entries in interfaces.items() for entry in entries}
    if address not in local:
        raise ConfigError("--rdzv-endpoint", endpoint, f"the route leaves from {address}, which no interface of this "
                                                       "node holds; set GLOO_SOCKET_IFNAME with --env")
    loopback = ipaddress.ip_address(target[0]).is_loopback
    if loopback and nnodes > 1:
        raise ConfigError("--rdzv-endpoint", endpoint, f"resolves to the loopback address {target[0]} here, which "
                                                       "the other nodes cannot reach: give the first node's NodeAddr "
                                                       "in slurm.conf (its network address)")
    return NodeRoute(address=address, interface=local[address], is_host=loopback or target[0] in local)


def node_torchrun(nnodes: int, nproc_per_node: int, endpoint: str, rdzv_id: str, train_args: list[str],
                  route: NodeRoute, environ: dict) -> tuple[list[str], dict]:
    """The node's torchrun command and the environment it adds: the socket interfaces from `route` (unless the
    job's environment sets them), the c10d rendezvous hosted by the node that holds its address, and this node's
    address for the workers' store (the hostname may not resolve)."""
    env = {name: route.interface for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if not environ.get(name)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node",
               str(nproc_per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
               "--rdzv-conf", f"is_host={str(route.is_host).lower()}", "--local-addr", route.address,
               "-m", "cogvx_mega.cli", "train", *train_args]
    return command, env


def launch_node(args, train_args: list[str]) -> None:
    """`cogvx launch node`: one node's part of a job (the sbatch script runs it once per node); replaces this
    process with the node's torchrun."""
    for name in ("nnodes", "nproc_per_node"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", getattr(args, name), "use a positive number")
    host, sep, port = args.rdzv_endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError("--rdzv-endpoint", args.rdzv_endpoint, "write HOST:PORT")
    route = route_to(host.strip("[]"), int(port), args.nnodes)
    command, env = node_torchrun(args.nnodes, args.nproc_per_node, args.rdzv_endpoint, args.rdzv_id, train_args,
                                 route, os.environ)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    interfaces = ", ".join(f"{name}={os.environ.get(name) or env[name]}"
                           for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"))
    print(f"cogvx: node {node} ({os.environ.get('SLURM_NODEID', '0')} of {args.nnodes}): address {route.address} on "
          f"{route.interface}, {interfaces}; rendezvous {args.rdzv_endpoint}"
          f"{' (hosted here)' if route.is_host else ''}", flush=True)
    os.execvpe(command[0], command, {**os.environ, **env})
