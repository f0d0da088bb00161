"""Interrupts and what a run shows: SIGINT, SIGTERM and SIGUSR1 save a verified checkpoint of the finished step
and exit with 128 + the signal in one line, and `--resume auto` continues to the losses of an uninterrupted run
with one metrics row per step; a second Ctrl-C ends the process at once; time-based saves; a resume from an older
checkpoint and a run dir without checkpoints keep metrics.jsonl to one row per step (the replaced rows set
aside); the plain log line of a batch job and the progress bar of a terminal."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from cogvx_mega.checkpoint.verify import verify_checkpoint
from cogvx_mega.cli import main
from cogvx_mega.training.checkpoint import list_checkpoints, step_folder

TINY = ["--preset", "tiny", "--data", "synthetic", "data.num_synthetic_clips=4", "training.micro_batch_size=2",
        "--device", "cpu"]


def train_in_subprocess(run_dir, *args, fault=None, stderr=subprocess.PIPE):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("COGVX_FAULT_INJECT", None)
    if fault:
        env["COGVX_FAULT_INJECT"] = fault
    return subprocess.run([sys.executable, "-m", "cogvx_mega.cli", "train", *TINY, "--run-dir", str(run_dir), *args],
                          env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300,
                          start_new_session=True)  # a SIGKILL fault kills its whole process group


def rows(run_dir, name="metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / name).read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in rows(run_dir)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 5-step run: the losses every interrupted-and-resumed run must reach."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *TINY, "--run-dir", str(run), "--steps", "5"]) == 0
    return losses(run)


@pytest.mark.parametrize("fault, name", [("sigint", "SIGINT"), ("sigterm", "SIGTERM"), ("sigusr1", "SIGUSR1")])
def test_a_signal_saves_the_finished_step_and_resume_continues_it(tmp_path, straight, fault, name):
    run = tmp_path / "run"
    result = train_in_subprocess(run, "--steps", "5", fault=f"{fault}@2")  # arrives inside the third step
    number = getattr(signal, name)
    assert result.returncode == 128 + number, result.stderr
    assert "Traceback" not in result.stderr
    final = [line for line in result.stderr.splitlines() if line.startswith("cogvx:")]
    assert final == [f"cogvx: interrupted by {name} at step 3: checkpoint saved at {step_folder(run, 3)}; continue "
                     f"with --resume auto"]
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003"]
    assert verify_checkpoint(step_folder(run, 3)).ok
    assert main(["train", *TINY, "--run-dir", str(run), "--steps", "5", "--resume", "auto"]) == 0
    assert [row["step"] for row in rows(run)] == [1, 2, 3, 4, 5]  # one row per step
    assert losses(run) == pytest.approx(straight, rel=1e-6)


def test_a_second_ctrl_c_aborts_at_once_without_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = train_in_subprocess(run, "--steps", "5", fault="sigint2@2")
    assert result.returncode == -signal.SIGINT  # the default action: no handler, no save
    assert list_checkpoints(run) == []
    assert [row["step"] for row in rows(run)] == [1, 2]


def test_resume_auto_on_a_run_without_checkpoints_says_it_starts_over(tmp_path, straight, capsys):
    run = tmp_path / "run"
    result = train_in_subprocess(run, "--steps", "5", "training.save_every_minutes=0", fault="step@3")  # SIGKILL
    assert result.returncode == -signal.SIGKILL and list_checkpoints(run) == []
    killed_rows = rows(run)
    assert [row["step"] for row in killed_rows] == [1, 2, 3]
    assert main(["train", *TINY, "--run-dir", str(run), "--steps", "5", "--resume", "auto"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "no checkpoint" in line]
    assert len(said) == 1 and "starting over at step 0" in said[0] and "metrics.replaced.jsonl" in said[0]
    assert [row["step"] for row in rows(run)] == [1, 2, 3, 4, 5]
    assert losses(run) == pytest.approx(straight, rel=1e-6)
    replaced = rows(run, "metrics.replaced.jsonl")
    assert [row["step"] for row in replaced] == [1, 2, 3]
    assert all(row["replaced_at_start_step"] == 0 for row in replaced)


def test_a_resume_from_an_older_checkpoint_replaces_the_later_rows(tmp_path, straight, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run), "--steps", "4", "training.save_interval=2"]) == 0
    first_line = rows(run)
    assert main(["train", *TINY, "--run-dir", str(run), "--steps", "5", "--resume", str(step_folder(run, 2))]) == 0
    assert [row["step"] for row in rows(run)] == [1, 2, 3, 4, 5]
    assert losses(run) == pytest.approx(straight, rel=1e-6)
    replaced = rows(run, "metrics.replaced.jsonl")
    assert [(row["step"], row["loss"]) for row in replaced] == [(r["step"], r["loss"]) for r in first_line[2:]]
    assert any("moved to metrics.replaced.jsonl" in line for line in capsys.readouterr().err.splitlines())


def test_a_row_cut_short_by_a_kill_is_set_aside(tmp_path):
    from cogvx_mega.training.metrics import set_aside_rows_after

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    assert set_aside_rows_after(tmp_path, 2) == 1
    assert [row["step"] for row in rows(tmp_path)] == [1, 2]
    assert rows(tmp_path, "metrics.replaced.jsonl") == [{"replaced_at_start_step": 2, "unreadable_row": '{"step": 3, "lo'}]


def test_time_based_saves(tmp_path, monkeypatch):
    from cogvx_mega.training import checkpointer

    clock = iter(range(0, 10_000, 40))  # every reading of the clock is 40 s after the previous one
    monkeypatch.setattr(checkpointer, "_clock", lambda: next(clock))
    common = [*TINY, "--steps", "4", "training.keep_checkpoints=10"]
    # training starts at 40 s; after step 1 the clock reads 80 s (40 s: not due at 1 minute), after step 2 120 s
    # (80 s: a save, which reads 160 s), after step 3 200 s (40 s since that save); the last step saves anyway
    assert main(["train", *common, "--run-dir", str(tmp_path / "minute"), "training.save_every_minutes=1"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "minute")] == ["step_00000002", "step_00000004"]
    assert main(["train", *common, "--run-dir", str(tmp_path / "off"), "training.save_every_minutes=0"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "off")] == ["step_00000004"]


def test_a_batch_job_log_gets_a_plain_line_every_log_interval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run), "--steps", "4", "training.log_interval=2"]) == 0
    err = capsys.readouterr().err.splitlines()
    logged = [line for line in err if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in logged] == ["step 2/4", "step 4/4"]
    assert [part.split(" ")[0] for part in logged[0].split(" | ")] == ["step", "loss", "grad_norm", "lr", "samples/s",
                                                                       "TFLOP/s"]
    assert float(logged[1].split(" | ")[1].split(" ")[1]) == pytest.approx(losses(run)[4], abs=1e-4)
    assert err[-1] == f"trained to step 4/4: final loss {losses(run)[4]:.4f}; checkpoint {step_folder(run, 4)}"
    assert not [line for line in err if "it/s" in line or "step/s" in line]  # no progress bar


def test_a_terminal_gets_the_progress_bar_instead(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # conftest quietens bars elsewhere
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal 120 wide
    try:
        process = subprocess.Popen([sys.executable, "-m", "cogvx_mega.cli", "train", *TINY, "--run-dir",
                                    str(tmp_path / "run"), "--steps", "2"], stdout=subprocess.DEVNULL,
                                   stderr=secondary, env=env)
        os.close(secondary)
        output = b""
        while True:
            ready, _, _ = select.select([primary], [], [], 120)
            if not ready:
                break
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the terminal closed: the process has ended
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(60) == 0
    finally:
        os.close(primary)
    text = output.decode(errors="replace")
    assert "train:" in text and "2/2" in text  # tqdm's bar
    assert "step 1/2 |" not in text


def test_a_run_dir_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"keep")
    for run_dir, needle in [(blocker / "run", "which is a file"), (blocker, "is a file")]:
        assert main(["train", *TINY, "--run-dir", str(run_dir), "--steps", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cogvx: error: --run-dir=") and needle in err[0], err
    assert blocker.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
