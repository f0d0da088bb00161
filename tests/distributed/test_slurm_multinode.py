"""`cogvx launch slurm --nodes 2` on a real 2-node SLURM cluster: two network namespaces joined by a veth pair, a
slurmd in each with its own NodeName (a hostname no resolver knows) and NodeAddr (tests/slurm_cluster.py,
NamespaceSlurm). Two ranks a node, tensor parallel inside a node and data parallel across the two: gloo's traffic
crosses the veth pair. Two jobs, each cut on its way and ending with the per-step losses and grad norms of one
process (rel 1e-5):
- the first twice: SLURM's time-limit signal (checkpoint, requeue by the script, resume), then a rank that hangs
  inside a step (every rank's `training.hang_timeout_s` watchdog dumps its threads' stacks to the job log and
  exits, the script requeues the job, the run resumes from its last checkpoint);
- the second by a node killed mid-step (every process in its namespace, slurmd too): SLURM marks it down and
  requeues the job, which resumes from the last checkpoint once the node is back.
One job takes both SLURM cuts to spare CI a job start (each start is 4 ranks importing torch on 2 cores)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import warnings

import pytest

from slurm_cluster import NamespaceSlurm, ensure_installed, namespaces_possible

STEPS = 6
COMMON = ["--preset", "tiny", "--data", "synthetic", "--device", "cpu", "--steps", str(STEPS),
          "training.micro_batch_size=1", "training.global_batch_size=2", "data.num_synthetic_clips=4",
          "training.save_interval=2"]
JOB = [*COMMON, "parallel.tensor_model_parallel_size=2"]  # 2 nodes x 2 ranks: TP2 in a node, DP2 across
HANG_TIMEOUT_S = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for reason in (namespaces_possible(), ensure_installed()):
        if reason is not None:
            pytest.skip(reason)
    slurm = NamespaceSlurm(tmp_path_factory.mktemp("slurm-2nodes"))
    try:
        slurm.start()
        addresses = slurm.node_addresses()
        print(f"nodes={len(addresses)} NodeAddrs={','.join(f'{n}={a}' for n, a in sorted(addresses.items()))}")
        yield slurm
    finally:
        slurm.stop()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The per-step rows of the same run in one process."""
    run = tmp_path_factory.mktemp("one-process") / "run"
    subprocess.run([sys.executable, "-m", "cogvx_mega.cli", "train", *COMMON, "--run-dir", str(run)], check=True,
                   capture_output=True)
    return read_metrics(run)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


class Job:
    """A 2-node job of JOB with the hang watchdog on, whose ranks get the fault `fault` (COGVX_FAULT_INJECT, see
    cogvx_mega.checkpoint.faults), firing once (`once`: the marker file) with the extra `fault_env`.

    A start that fails before training begins (no step, no resume: a start-up race of SLURM or the rendezvous on
    a loaded 2-core machine) is requeued by the script as on a cluster, counted as one of its failures; the test
    starts it again at once, at most `STARTUP_RETRIES` times, and warns with its log (a RuntimeWarning: pytest's
    warnings summary shows it, and xdist can rebuild it, which it cannot for a class defined in a test module). A
    failure after training began is never retried here: it fails the test."""

    STARTUP_RETRIES = 1

    def __init__(self, cluster: NamespaceSlurm, run_dir, fault: str, once, fault_env: tuple = ()):
        self.cluster, self.run_dir = cluster, run_dir
        env = ["OMP_NUM_THREADS=1", f"COGVX_FAULT_INJECT={fault}", f"COGVX_FAULT_INJECT_ONCE={once}", *fault_env]
        launched = cluster.run([sys.executable, "-m", "cogvx_mega.cli", "launch", "slurm", "--nodes", "2",
                                "--gpus-per-node", "2", *(arg for pair in env for arg in ("--env", pair)), "--",
                                *JOB, f"training.hang_timeout_s={HANG_TIMEOUT_S}", "--run-dir", str(run_dir)])
        assert launched.returncode == 0, launched.stderr
        self.id = re.search(r"submitted job (\d+)", launched.stdout).group(1)
        self.log = next(iter((run_dir / "slurm").glob("*.sbatch"))).with_name(f"cogvx-{run_dir.name}-{self.id}.out")
        self.restarts = 0  # SLURM's count of requeues seen so far
        self.retried = 0

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start_log(self, restart: int) -> str:
        """The log of one start of the job (restart 0 is the first)."""
        text = self.text()
        begin = text.find(f"cogvx: job {self.id} (restart {restart})")
        end = text.find(f"cogvx: job {self.id} (restart {restart + 1})")
        return text[begin:end if end >= 0 else len(text)] if begin >= 0 else ""

    def state(self) -> dict:
        info = self.cluster.job(self.id)
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT"):
            raise AssertionError(f"job {self.id} {info.get('JobState')}:\n{self.text()[-6000:]}")
        return info

    def steps_done(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def _ended(self) -> str:
        """"requeued" (the next requeue, the job pending again), "completed", or "" while it runs."""
        info = self.state()
        if info.get("JobState") == "COMPLETED":
            return "completed"
        requeued = int(info.get("Restarts", "0")) > self.restarts and info.get("JobState") == "PENDING"
        return "requeued" if requeued else ""

    def wait_end(self, timeout: float) -> str:
        """Wait until this start ends: "requeued" or "completed". A start that failed before training began is
        started again (see the class)."""
        while True:
            try:
                how = wait_until(self._ended, timeout, f"job {self.id} (restart {self.restarts}) to end")
            except AssertionError as error:
                raise AssertionError(f"{error}: {self.cluster.job(self.id)}\n{self.text()[-6000:]}") from None
            if how == "completed":
                return how
            self.restarts += 1
            attempt = self.start_log(self.restarts - 1)
            before_training = ("the run failed" in attempt and "resumed from" not in attempt
                               and not re.search(r"^step \d+/", attempt, re.MULTILINE))
            if not before_training or self.retried >= self.STARTUP_RETRIES:
                return how
            self.retried += 1
            warnings.warn(f"job {self.id}: start {self.restarts - 1} failed before training began and was started "
                          f"again; its log:\n{attempt[-4000:]}", RuntimeWarning)
            self.start_again()

    def wait_requeued(self, timeout: float) -> None:
        assert self.wait_end(timeout) == "requeued", f"job {self.id} completed:\n{self.text()[-6000:]}"

    def start_again(self) -> None:
        """Start the requeued job now, not after SLURM's 120 s."""
        self.cluster.start_now(self.id)

    def finish(self) -> str:
        """Start the requeued job and wait for it to complete."""
        self.start_again()
        how = self.wait_end(180)
        text = self.text()
        assert how == "completed", f"job {self.id} was requeued again:\n{text[-6000:]}"
        assert f"(restart {self.restarts})" in text and "resumed from" in text, text[-6000:]
        return text


def assert_one_process_losses(run_dir, expected) -> None:
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for got, want in zip(rows, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), got["step"]


def assert_two_nodes(cluster: NamespaceSlurm, text: str) -> None:
    """Each node ran its own torchrun, on its own address and interface, the first hosting the rendezvous."""
    for index, (name, address) in enumerate(zip(cluster.names, cluster.addresses)):
        line = re.search(rf"cogvx: node {name} \({index} of 2\): address {re.escape(address)} on (\S+), "
                         r"GLOO_SOCKET_IFNAME=(\S+), NCCL_SOCKET_IFNAME=(\S+); rendezvous (\S+)(.*)", text)
        assert line is not None, text[-6000:]
        interface, gloo, nccl, endpoint, hosted = line.groups()
        assert interface == cluster.links[index] and gloo == nccl == interface
        assert endpoint.startswith(f"{cluster.addresses[0]}:") and (hosted == " (hosted here)") == (index == 0)


@pytest.mark.timeout(420)
def test_a_time_limit_requeue_then_a_hung_rank_end_as_one_process(cluster, one_process, tmp_path):
    run, fired = tmp_path / "run", tmp_path / "hang-fired"
    job = Job(cluster, run, "hang@2", fired, fault_env=("COGVX_FAULT_INJECT_RANK=3",))
    # 1. the time limit: what --signal does before it (the run stops after step 1 with a checkpoint)
    wait_until(lambda: "cogvx: job" in job.text(), 120, "the job to start (its trap set)")
    cluster.run(["scancel", "--signal=USR1", "--batch", job.id], check=True)
    job.wait_requeued(180)
    text = job.text()
    assert "time limit near: checkpoint, then requeue" in text and f"cogvx: requeue job {job.id}" in text
    assert f"on {cluster.names[0][:-1]}[0-1]" in text  # one job on both nodes
    assert_two_nodes(cluster, text)
    assert job.steps_done() == 1 and not fired.exists()
    # 2. resumed at step 1, rank 3 (node cxn1) sleeps inside step 3, after step 2's checkpoint: its watchdog (and
    # every other rank's, blocked in a collective) ends it, and the script requeues the failed run
    job.start_again()
    job.wait_requeued(120 + 4 * HANG_TIMEOUT_S)
    text = job.text()
    # rank 3 stopped after its gradients' data-parallel reduction, so node 0's ranks (a TP group) finished step 3
    # and waited in the next step's collectives: the row of step 3 is written, the checkpoint is step 2's
    assert fired.exists() and job.steps_done() == 3
    header = re.search(r"cogvx: rank 3 \(node cxn1\): no training progress for ([\d.]+) s after step 2", text)
    assert header is not None, text[-6000:]
    assert float(header.group(1)) <= HANG_TIMEOUT_S + 2  # found within the timeout (checked every 0.6 s)
    assert "in hang_here" in text[header.end():]  # faulthandler's dump: the frame the rank was stuck in
    assert "in hang_here" in (run / "hangs" / "step2-rank3.txt").read_text()  # and its copy in the run dir
    assert re.search(rf"the run failed \(exit \d+\): requeue job {job.id} \(failure \d of at most 3\)", text)
    # 3. resumed at step 2, it runs to the end (the hang fires once)
    text = job.finish()
    assert "hang_here" not in job.start_log(job.restarts)
    assert_one_process_losses(run, one_process)


@pytest.mark.timeout(300)
def test_a_node_killed_mid_step_is_requeued_by_slurm_and_resumes_as_one_process(cluster, one_process, tmp_path):
    run, slowed = tmp_path / "run", tmp_path / "slowed"
    # one rank lags 2 s from step 4 on (until the kill: once), so the kill after step 3 lands inside step 4, after
    # the checkpoint of step 2
    job = Job(cluster, run, "slow@3", slowed, fault_env=("COGVX_FAULT_INJECT_SLOW_S=2",))
    wait_until(lambda: job.state() and job.steps_done() >= 3, 120, "step 3")
    assert cluster.kill_node(1)
    # the ranks on node 0 lose their peers and fail (or their watchdog ends them); SLURM finds node 1 not
    # responding (SlurmdTimeout) and requeues the job itself (NODE_FAIL with --requeue)
    job.wait_requeued(90)
    assert job.steps_done() == 3 and slowed.exists()
    cluster.start_slurmd(1)  # the node is back (ReturnToService=2)
    cluster.wait_idle()
    text = job.finish()
    assert "DUE TO NODE FAILURE" in text
    assert_one_process_losses(run, one_process)
