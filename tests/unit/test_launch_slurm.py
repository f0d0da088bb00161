"""The sbatch script `cogvx launch slurm --dry-run` prints for 2 nodes x 8 GPUs, field by field (the real-SLURM run
is tests/distributed/test_slurm_multinode.py); bad input (no sbatch on PATH, a layout that does not fit the nodes,
a malformed time, no training arguments) is one line, exit 2, nothing written or submitted."""
from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from cogvx_mega.cli import EXIT_USER_ERROR, main


def launch(*args):
    return ["launch", "slurm", *args]


def test_the_2x8_script_field_by_field(tmp_path, capsys):
    run = tmp_path / "runs" / "5b"
    assert main(launch("--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "04:00:00",
                       "--account", "proj", "--qos", "high", "--cpus-per-task", "96", "--env", "NCCL_SOCKET_IFNAME=ib0",
                       "--dry-run", "--", "--preset", "cogvideox-5b", "--data", "synthetic", "--run-dir", str(run),
                       "parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2")) == 0
    script = capsys.readouterr().out
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = dict(line[len("#SBATCH --"):].split("=", 1) for line in lines if line.startswith("#SBATCH --")
                      and "=" in line)
    assert directives == {"job-name": "cogvx-5b", "nodes": "2", "ntasks-per-node": "1", "gpus-per-node": "8",
                          "cpus-per-task": "96", "time": "04:00:00", "partition": "gpu", "account": "proj",
                          "qos": "high", "output": f"{run}/slurm/cogvx-5b-%j.out", "open-mode": "append",
                          "signal": "B:USR1@300"}
    assert {"#SBATCH --requeue", "#SBATCH --exclusive"} <= set(lines)
    exports = dict(line[len("export "):].split("=", 1) for line in lines if line.startswith("export "))
    # the rendezvous host is the first node's NodeAddr, what slurmctld reaches it by (its name may not resolve)
    assert 'first_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in lines
    assert exports["MASTER_ADDR"] == '"${MASTER_ADDR:-$first_node}"'
    # a port for each start of the job (its restart count): a requeued job started at once meets no old store
    assert exports["MASTER_PORT"] == '"$((20000 + (SLURM_JOB_ID * 10 + ${SLURM_RESTART_COUNT:-0} % 10) % 20000))"'
    port = subprocess.run(["bash", "-c", f"SLURM_JOB_ID=1234 SLURM_RESTART_COUNT=3; echo {exports['MASTER_PORT']}"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert port == [str(20000 + 12343)]
    assert exports["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and exports["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert exports["NCCL_SOCKET_IFNAME"] == "ib0" and exports["OMP_NUM_THREADS"] == "12"  # 96 CPUs / 8 ranks
    assert "trap on_time_limit USR1" in lines
    (srun,) = [line for line in lines if line.startswith("srun ")]
    words = shlex.split(srun.rstrip(" &").replace("$", "DOLLAR"))
    assert words[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    node = words[3:words.index("--")]
    assert node == [sys.executable, "-m", "cogvx_mega.cli", "launch", "node", "--nnodes", "DOLLARSLURM_NNODES",
                    "--nproc-per-node", "8", "--rdzv-endpoint", "DOLLARMASTER_ADDR:DOLLARMASTER_PORT", "--rdzv-id",
                    "DOLLARSLURM_JOB_ID"]
    train = words[words.index("--") + 1:]
    assert train == ["--preset", "cogvideox-5b", "--data", "synthetic",
                     "parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2", "--run-dir", str(run),
                     f"training.stop_file={run}/.stop-requested", "--resume", "auto"]
    # a failed run (the hang watchdog, a lost peer) is requeued at most --max-failures times, counted per job
    assert f"FAILURES_FILE={run}/slurm/cogvx-5b-$SLURM_JOB_ID.failures" in lines
    assert '  if [ "$failures" -le 3 ]; then' in lines
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert not run.exists()  # a dry run writes nothing


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "1", "--gpus-per-node", "2", "--", "--preset", "tiny", "parallel.tensor_model_parallel_size=4"],
     "needs a multiple of 4"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "4h", "--", "--preset", "tiny"], "SLURM's time format"),
    (["--nodes", "1", "--gpus-per-node", "1"], "after --"),
    (["--nodes", "1", "--gpus-per-node", "1", "--", "--preset", "tiny", "--dry-run"], "not a training argument"),
    (["--nodes", "0", "--gpus-per-node", "1", "--", "--preset", "tiny"], "positive"),
    (["--nodes", "1", "--gpus-per-node", "1", "--max-failures", "-1", "--", "--preset", "tiny"], "use 0"),
    (["--nodes", "1", "--gpus-per-node", "1", "--", "--preset", "tiny", "--device", "cpu"], "sbatch"),  # PATH empty
])
def test_bad_launch_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    run = tmp_path / "run"
    assert main(launch(*args, "--run-dir", str(run)) if "--" in args else launch(*args)) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and needle in error[0], error
    assert not run.exists()


def test_a_node_finds_its_route_interface_and_whether_it_hosts_the_rendezvous():
    """`cogvx launch node` on this machine: the route to a loopback rendezvous leaves from lo, this node hosts it,
    and the node's torchrun gets the interface for gloo and NCCL unless the job's environment names one (the
    2-node case, each node on its veth, is tests/distributed/test_slurm_multinode.py)."""
    from cogvx_mega.tools.launch import node_torchrun, route_to

    route = route_to("127.0.0.1", 29500, nnodes=1)
    assert (route.address, route.interface, route.is_host) == ("127.0.0.1", "lo", True)
    command, env = node_torchrun(1, 2, "127.0.0.1:29500", "7", ["--preset", "tiny"], route, environ={})
    assert env == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    assert command[command.index("--rdzv-conf") + 1] == "is_host=true"
    assert command[command.index("--local-addr") + 1] == "127.0.0.1"
    assert command[-4:] == ["cogvx_mega.cli", "train", "--preset", "tiny"]
    _, env = node_torchrun(1, 2, "127.0.0.1:29500", "7", [], route, environ={"NCCL_SOCKET_IFNAME": "ib0"})
    assert env == {"GLOO_SOCKET_IFNAME": "lo"}


@pytest.mark.parametrize("endpoint, nnodes, needle", [
    ("127.0.0.1:29500", 2, "loopback address 127.0.0.1"),  # Debian's hostname -> 127.0.1.1 trap on a multi-node job
    ("no-such-host.invalid:29500", 2, "does not resolve"),
    ("10.0.0.1", 2, "HOST:PORT"),
])
def test_a_node_that_cannot_reach_the_rendezvous_is_one_line_exit_2(capsys, endpoint, nnodes, needle):
    assert main(["launch", "node", "--nnodes", str(nnodes), "--nproc-per-node", "1", "--rdzv-endpoint", endpoint,
                 "--rdzv-id", "1", "--", "--preset", "tiny"]) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and needle in error[0], error
