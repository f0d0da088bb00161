"""A real SLURM on this machine for the launcher's tests: munge, slurmctld and slurmd on localhost, all state in
one temporary folder, clients pointed at it with SLURM_CONF (../shared/notes/slurm-on-localhost.md has the
recipe). Debian's slurm-wlm and munge are installed with apt-get when missing and this process is root;
otherwise the tests that need it skip with the reason."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def ensure_installed() -> str | None:
    """None when SLURM is there (or was installed now), else why it cannot be."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "needs SLURM (Debian: apt-get install slurm-wlm munge, as root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            return f"could not install SLURM: {' '.join(command)}: {result.stderr.strip()[-300:]}"
    return None


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]

    def start(self) -> None:
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        cpus = os.cpu_count() or 1
        self.conf.write_text("\n".join([
            "ClusterName=cogvxtest", f"SlurmctldHost={self.host}", "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool",
            f"SlurmctldLogFile={self.root}/log/ctld.log", f"SlurmdLogFile={self.root}/log/d.log",
            f"SlurmctldPidFile={self.root}/ctld.pid", f"SlurmdPidFile={self.root}/d.pid", "ReturnToService=2",
            "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none", "MinJobAge=600",
            f"NodeName={self.host} CPUs={cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""]))
        os.environ["SLURM_CONF"] = str(self.conf)
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True)
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node did not come up (sinfo: {state!r}); logs in {self.root}/log")

    def _start_munge(self) -> None:
        if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        for folder in ("/etc/munge", "/run/munge", "/var/log/munge", "/var/lib/munge"):
            if Path(folder).exists():
                shutil.chown(folder, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        subprocess.run(["munged", "--force"], check=True)

    def stop(self) -> None:
        for pid_file in ("ctld.pid", "d.pid"):
            path = self.root / pid_file
            if path.exists():
                try:
                    os.kill(int(path.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        os.environ.pop("SLURM_CONF", None)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_for(self, job_id: str, states: set, timeout: float = 180) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}")
