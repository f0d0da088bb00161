"""A real SLURM on this machine for the launcher's tests: munge, slurmctld and one slurmd per node, each node in
its own network namespace, all state in one temporary folder, clients pointed at it with SLURM_CONF
(../shared/notes/slurm-on-localhost.md and network-namespaces.md have the recipes). Debian's slurm-wlm and munge
are installed with apt-get when missing and this process is root; otherwise the tests that need it skip with the
reason."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
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


def start_munge() -> None:
    """The machine's munged (one serves every node: its socket is a file), started unless it answers. Two test
    workers may start it at once: the one that loses the race finds it answering."""
    def answers() -> bool:
        return subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0

    if answers():
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
    started = subprocess.run(["munged", "--force"], capture_output=True, text=True)
    deadline = time.time() + 10
    while not answers():
        if time.time() > deadline:
            raise RuntimeError(f"munged did not start: {started.stderr.strip()}")
        time.sleep(0.2)

NETNS_PREFIX = "cogvxt"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces_possible() -> str | None:
    """None when this process can make network namespaces (root, iproute2, nsenter, unshare), else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
    return f"needs {', '.join(missing)}" if missing else None


class NamespaceSlurm:
    """A 2-node SLURM cluster on this machine, each node its own network namespace (and UTS namespace, so its
    hostname is its NodeName, which no resolver knows), joined by a veth pair, with addresses 10.213.7.N/24 that
    exist only inside the namespaces made here. slurmctld runs in the first node's
    namespace, so clients (`sbatch`, `scontrol`) run there too: `self.command(...)` prefixes them. munged is the
    machine's (its socket is a file every namespace sees); the run dirs under the test's tmp folder are the shared
    filesystem. `stop()` kills every process in the namespaces and deletes them, leaving nothing behind."""

    SUBNET = "10.213.7"

    def __init__(self, root: Path, nodes: int = 2):
        if nodes != 2:
            raise ValueError("this cluster has 2 nodes (one veth pair); more would need a bridge namespace")
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.tag = f"{NETNS_PREFIX}{os.getpid()}"
        self.names = [f"cxn{index}" for index in range(nodes)]  # NodeNames and hostnames
        self.namespaces = [f"{self.tag}-{index}" for index in range(nodes)]
        self.addresses = [f"{self.SUBNET}.{index + 1}" for index in range(nodes)]
        self.started = False

    # namespaces and their network
    @staticmethod
    def remove_leftovers() -> None:
        """Namespaces of an earlier test process that died without its teardown."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for name in listed:
            if name.startswith(NETNS_PREFIX) and "-" in name:
                owner = name[len(NETNS_PREFIX):].split("-")[0]
                if owner.isdigit() and not _alive(int(owner)):
                    NamespaceSlurm._kill_namespace(name)
                    subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def _make_network(self) -> None:
        for namespace in self.namespaces:
            self._ip("netns", "add", namespace)
            self._ip("-n", namespace, "link", "set", "lo", "up")
        short = str(os.getpid())[-6:]  # interface names have 15 characters at most
        links = [f"cx{short}a", f"cx{short}b"]
        self._ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        self.links = links
        for namespace, link, address in zip(self.namespaces, links, self.addresses):
            self._ip("link", "set", link, "netns", namespace)
            self._ip("-n", namespace, "addr", "add", f"{address}/24", "dev", link)
            self._ip("-n", namespace, "link", "set", link, "up")

    def in_node(self, index: int, command: list[str], hostname: bool = False) -> list[str]:
        """`command` run in node `index`'s network namespace (nsenter keeps the machine's /sys, which slurmd's
        cgroup probe reads; `ip netns exec` remounts it), with the node's hostname when `hostname`."""
        entered = ["nsenter", f"--net=/var/run/netns/{self.namespaces[index]}"]
        if hostname:
            quoted = " ".join(shlex.quote(part) for part in command)
            return [*entered, "unshare", "--uts", "sh", "-c", f"hostname {self.names[index]} && exec {quoted}"]
        return [*entered, *command]

    def command(self, command: list[str]) -> list[str]:
        """A SLURM client command (or anything that submits a job), run where the controller is."""
        return self.in_node(0, ["env", f"SLURM_CONF={self.conf}", *command])

    def run(self, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(command), capture_output=True, text=True, **kwargs)

    # SLURM
    def start(self) -> None:
        self.remove_leftovers()
        self.started = True
        self._make_network()
        for name in ("state", "log", *(f"spool-{node}" for node in self.names)):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        start_munge()
        cpus = os.cpu_count() or 1
        nodes = [f"NodeName={name} NodeAddr={address} CPUs={cpus} State=UNKNOWN"
                 for name, address in zip(self.names, self.addresses)]
        self.conf.write_text("\n".join([
            "ClusterName=cogvxmulti", f"SlurmctldHost={self.names[0]}({self.addresses[0]})", "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool-%n",
            f"SlurmctldLogFile={self.root}/log/ctld.log", f"SlurmdLogFile={self.root}/log/d-%n.log",
            f"SlurmctldPidFile={self.root}/ctld.pid", f"SlurmdPidFile={self.root}/d-%n.pid", "ReturnToService=2",
            "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none", "MinJobAge=600",
            "SlurmdTimeout=5",  # a lost node is noticed in about 10-20 s here (300 s by default)
            *nodes, f"PartitionName=debug Nodes={','.join(self.names)} Default=YES MaxTime=INFINITE State=UP", ""]))
        subprocess.run(self.in_node(0, ["slurmctld", "-f", str(self.conf)], hostname=True), check=True)
        for index in range(len(self.names)):
            self.start_slurmd(index)
        self.wait_idle()

    def start_slurmd(self, index: int) -> None:
        subprocess.run(self.in_node(index, ["slurmd", "-f", str(self.conf), "-N", self.names[index]], hostname=True),
                       check=True)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.split("\n")
            if sum(line.split()[1:2] == ["idle"] for line in states if line.strip()) == len(self.names):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM nodes did not come up (sinfo: {states!r}); logs in {self.root}/log")

    def node_addresses(self) -> dict:
        """NodeName -> NodeAddr, as SLURM reports them."""
        out = self.run(["scontrol", "-o", "show", "node"]).stdout
        nodes = [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in out.splitlines()]
        return {node["NodeName"]: node["NodeAddr"] for node in nodes}

    def kill_node(self, index: int) -> list[int]:
        """SIGKILL every process of node `index` (its slurmd and the job's processes there): a lost node."""
        return self._kill_namespace(self.namespaces[index])

    @staticmethod
    def _kill_namespace(namespace: str) -> list[int]:
        pids = [int(pid) for pid in subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                                                   text=True).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def job(self, job_id: str) -> dict:
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_for(self, job_id: str, states: set, timeout: float = 180) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}")

    def start_now(self, job_id: str) -> None:
        """Skip the 120 s SLURM waits before a requeued job may start again. SLURM revokes the old run's
        credential with a time stamp in whole seconds and refuses a start in that same second, so wait it out."""
        time.sleep(2.0)
        self.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)

    def stop(self) -> None:
        if not self.started:
            return
        for namespace in self.namespaces:
            self._kill_namespace(namespace)
        for namespace in self.namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        self.started = False
