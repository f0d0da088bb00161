"""The sbatch script `cogvx launch slurm --dry-run` prints for 2 nodes x 8 GPUs, field by field (the real-SLURM run
is tests/distributed/test_slurm_requeue.py); bad input (no sbatch on PATH, a layout that does not fit the nodes,
a malformed time, no training arguments) is one line, exit 2, nothing written or submitted."""
from __future__ import annotations

import shlex
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
    assert exports["MASTER_ADDR"] == '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
    assert exports["MASTER_PORT"] == '"$((20000 + SLURM_JOB_ID % 20000))"'
    assert exports["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and exports["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert exports["NCCL_SOCKET_IFNAME"] == "ib0" and exports["OMP_NUM_THREADS"] == "12"  # 96 CPUs / 8 ranks
    assert "trap on_time_limit USR1" in lines
    (srun,) = [line for line in lines if line.startswith("srun ")]
    words = shlex.split(srun.rstrip(" &").replace("$", "DOLLAR"))
    assert words[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    torchrun = words[3:words.index("cogvx_mega.cli") + 1]
    assert torchrun == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "DOLLARSLURM_NNODES",
                        "--nproc-per-node", "8", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                        "DOLLARMASTER_ADDR:DOLLARMASTER_PORT", "--rdzv-id", "DOLLARSLURM_JOB_ID", "-m", "cogvx_mega.cli"]
    train = words[words.index("cogvx_mega.cli") + 1:]
    assert train == ["train", "--preset", "cogvideox-5b", "--data", "synthetic",
                     "parallel.tensor_model_parallel_size=2", "parallel.context_parallel_size=2", "--run-dir", str(run),
                     f"training.stop_file={run}/.stop-requested", "--resume", "auto"]
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert not run.exists()  # a dry run writes nothing


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "1", "--gpus-per-node", "2", "--", "--preset", "tiny", "parallel.tensor_model_parallel_size=4"],
     "needs a multiple of 4"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "4h", "--", "--preset", "tiny"], "SLURM's time format"),
    (["--nodes", "1", "--gpus-per-node", "1"], "after --"),
    (["--nodes", "1", "--gpus-per-node", "1", "--", "--preset", "tiny", "--dry-run"], "not a training argument"),
    (["--nodes", "0", "--gpus-per-node", "1", "--", "--preset", "tiny"], "positive"),
    (["--nodes", "1", "--gpus-per-node", "1", "--", "--preset", "tiny", "--device", "cpu"], "sbatch"),  # PATH empty
])
def test_bad_launch_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    run = tmp_path / "run"
    assert main(launch(*args, "--run-dir", str(run)) if "--" in args else launch(*args)) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and needle in error[0], error
    assert not run.exists()
