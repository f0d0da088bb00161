"""benchmarks/gpu_suite.sh: its plans fit the device budget (a lent GPU gives 15 minutes in all, start-up and
staging included: Plan A at most 360 s of step limits, Plan B at most 300 s), and the CPU rehearsal runs every
Plan A step end to end through the target-folder install, with the editable install off the import path."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")]
CAPS = {"a": 360, "b": 300}  # fixed here, not read from the script: the suite must fit them


def test_each_plan_fits_its_cap_and_adds_up_its_steps():
    out = subprocess.run([*SUITE, "--budget"], capture_output=True, text=True, check=True).stdout
    for plan, cap in CAPS.items():
        limits = [int(n) for n in re.findall(rf"^plan {plan}\s+\S+\s+(\d+) s", out, re.MULTILINE)]
        total = int(re.search(rf"^plan {plan}: (\d+) s", out, re.MULTILINE).group(1))
        assert limits and total == sum(limits), out
        assert total <= cap, f"plan {plan}: {total} s of step limits, over the {cap} s cap\n{out}"


@pytest.mark.timeout(600)
def test_the_plan_a_rehearsal_runs_every_step(tmp_path):
    done = subprocess.run([*SUITE, "--plan", "a", "--rehearse", "--out", str(tmp_path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_suite.json").read_text())
    steps = {step["step"]: step for step in record["steps"]}
    expected = ["install", "device", "tests", "bench-rope", "bench-adaln", "bench-causal-pad", "step-bf16-vs-diffusers",
                "step-packed", "torchrun-save-resume"]
    assert list(steps) == expected
    assert all(step["exit"] == 0 and step["status"] == "ok" for step in steps.values())
    assert "passed" in steps["tests"]["output"]  # the kernels' CPU tests ran from the target folder
    step = next(r for r in steps["step-bf16-vs-diffusers"]["results"] if r["kind"] == "train_step")
    assert step["speedup"] > 0 and step["device_type"] == "cpu"
    assert any(r["variant"] == "triton (cogvx)" for r in steps["bench-rope"]["results"])  # the interpreter ran it
    assert "resumed from" in steps["torchrun-save-resume"]["output"]
    # every target line is printed, none claimed met on a CPU
    assert done.stdout.count("not run") == 4 and " met " not in done.stdout


def test_the_plan_b_rehearsal_skips_what_needs_transformer_engine(tmp_path):
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("transformer_engine"):
        pytest.skip("Transformer Engine is installed here: plan b would run its steps")
    done = subprocess.run([*SUITE, "--plan", "b", "--rehearse", "--out", str(tmp_path)], capture_output=True,
                          text=True, check=True)
    steps = json.loads((tmp_path / "gpu_suite.json").read_text())["steps"]
    assert steps[0]["step"] == "install" and steps[0]["status"] == "ok"
    assert all(step["status"] == "skipped" and "Transformer Engine" in step["output"] for step in steps[1:])
    assert "TE FP8 step vs TE bf16 step: not run" in done.stdout
