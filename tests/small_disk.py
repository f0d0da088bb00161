"""A small disk for the tests of a full disk: a tmpfs mounted in a private mount namespace (root only), the
commands run on it, and what it holds afterwards, listed before the namespace and its tmpfs go away."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest


def namespace_problem() -> str | None:
    """Why a tmpfs cannot be mounted in a private mount namespace here, or None when it can."""
    if os.geteuid() != 0:
        return "mounting a tmpfs in a private mount namespace needs root"
    if shutil.which("unshare") is None:
        return "no unshare here"
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                f"mount -t tmpfs -o size=4k tmpfs {shlex.quote(folder)} && touch {folder}/x"],
                               capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"unshare + mount of a tmpfs fail here: {probe.stderr.strip()[:200]}"
    return None


def skip_without_small_disks() -> None:
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str
    left: list[str]
    """What the disk held afterwards, relative to it (files and folders)."""

    @property
    def full_disk_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if "No space left on device" in line]


def cogvx(*args) -> str:
    """The shell command of `cogvx ARGS` in this interpreter."""
    return shlex.join([sys.executable, "-m", "cogvx_mega.cli", *map(str, args)])


def python(code: str, *args) -> str:
    """The shell command of `python -c CODE ARGS` in this interpreter."""
    return shlex.join([sys.executable, "-c", code, *map(str, args)])


def on_small_disk(disk: Path, size: str, *commands: str) -> list[Outcome]:
    """Mount a tmpfs of `size` on `disk` in a private mount namespace and run the shell `commands` on it one after
    the other; each one's status, stdout, stderr and what the disk then holds."""
    disk.mkdir(parents=True, exist_ok=True)
    logs = disk.parent / f"{disk.name}-logs"
    logs.mkdir(exist_ok=True)
    script = [f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(disk))} || exit 99"]
    for number, command in enumerate(commands):
        script += [f"{command} >{logs}/out{number} 2>{logs}/err{number}", f"echo STATUS{number}=$?",
                   f"find {shlex.quote(str(disk))} -mindepth 1 -printf 'LEFT{number}=%P\\n'"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
                          capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    outcomes = []
    for number in range(len(commands)):
        status = [int(line.split("=", 1)[1]) for line in lines if line.startswith(f"STATUS{number}=")]
        assert len(status) == 1, done.stdout
        outcomes.append(Outcome(status[0], (logs / f"out{number}").read_text(), (logs / f"err{number}").read_text(),
                                sorted(line.split("=", 1)[1] for line in lines if line.startswith(f"LEFT{number}="))))
    return outcomes
