"""The GPU suite: every check and benchmark that needs the GPU, in two plans that fit the device budget.

    bash benchmarks/gpu_suite.sh --budget              # each step's time limit and each plan's total; runs nothing
    bash benchmarks/gpu_suite.sh --plan a              # on the GPU machine (Plan A needs no Transformer Engine)
    bash benchmarks/gpu_suite.sh --plan b              # after Transformer Engine is installed there
    bash benchmarks/gpu_suite.sh --plan a --rehearse   # the same steps on this CPU at tiny shapes (CI runs it)

Plan A (staged with `bash ../shared/device/stage-gpu-deps.sh --no-te diffusers==0.42.1`, one device call that
starts with `bash .gpu/install.sh`): the project installed into a target folder, the GPU tests that need no
Transformer Engine (the kernels at CogVideoX-5B shapes, the whole model in bf16 against the fp32 CPU reference),
the RoPE, AdaLN and causal-pad kernels against their torch references and the copy bandwidth, one 5B-width
4-layer bf16 training step beside diffusers' in the same process, the packed step, and a one-GPU torchrun job
over NCCL that saves and resumes a checkpoint. Plan B (Transformer Engine staged in chunk calls; `.gpu/install.sh`
may rebuild TE's torch extension first, about 2 minutes, outside these limits): TE bf16 and FP8 steps at the
same shape, the TE-backend GPU tests, TE attention with context parallel on one GPU as far as one GPU allows.

Each step runs under its own time limit (a hung step costs its limit, not the plan); `--budget` adds them up, and
tests/unit/test_gpu_suite.py holds the totals to the caps (Plan A 360 s, Plan B 300 s), so the suite cannot
outgrow the device budget. Each step's record goes to $OUT as soon as it ends (a plan that is cut off still
returns what it did): $OUT/gpu_suite.json, $OUT/gpu_suite.md and $OUT/<step>.log. The suite ends with one line
per target: met, missed or not run, with the figure. Exit status: the number of failed steps.

The rehearsal runs every step of the plan on the CPU at tiny shapes (the Triton interpreter, the tiny preset, two
training steps) through the same target-folder install, with the editable install taken off the import path, so
the first run on a device is never the first time the suite runs end to end. Steps that need Transformer Engine
are skipped, with the reason, where it is not installed.

Standard library only: it runs before anything of the project is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
CAPS = {"a": 360, "b": 300}
DEVICE_SITE = "/tmp/cogvx-site"  # the project, installed on the GPU machine
STAGED_SITE = "/tmp/site"  # what ../shared/device/stage-gpu-deps.sh installs there
PY = sys.executable
MODEL_TEST = "tests/gpu/test_model_gpu.py::test_the_model_in_bf16_on_the_gpu_matches_the_fp32_cpu_reference"


@dataclass
class Step:
    """One command of a plan. `rehearsal` is its CPU form at tiny shapes (None: the same command)."""

    name: str
    limit: int
    command: list[str]
    rehearsal: Optional[list[str]] = None
    needs_te: bool = False


def install_command(site: str) -> list[str]:
    return [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "--target", site,
            str(ROOT)]


PROBE = ("import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if "
         "torch.cuda.is_available() else 'no CUDA (rehearsal on the CPU)', flush=True)")
FIVE_B_STEP = ["--preset", "cogvideox-5b", "--micro-batch", "1", "--steps", "5", "--warmup", "2",
               "model.num_layers=4"]
TINY_STEP = ["--preset", "tiny", "--steps", "2", "--warmup", "1"]
GPU_TESTS = [PY, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/gpu/test_kernels_gpu.py",
             "tests/gpu/test_causal_pad_kernel.py", "tests/gpu/test_model_gpu.py"]


def torchrun_save_and_resume(device: str, run_dir: str) -> list[str]:
    """Two torchrun jobs of one rank: four steps saving at 2 and 4, then a resume of the same run to step 6."""
    train = (f"{PY} -m torch.distributed.run --standalone --nproc-per-node 1 -m cogvx_mega.cli train --preset tiny "
             f"--device {device} --run-dir {run_dir} training.save_interval=2")
    return ["bash", "-c", f"rm -rf {run_dir} && {train} --steps 4 && {train} --steps 6 --resume auto"]


def plan_steps(plan: str, site: str, out: str) -> list[Step]:
    run_dir = f"{out}/torchrun-run"
    if plan == "a":
        return [
            Step("install", 30, install_command(site)),
            Step("device", 10, [PY, "-c", PROBE]),
            Step("tests", 75, [*GPU_TESTS],
                 # the GPU modules skip without CUDA; the kernels' CPU tests (Triton interpreter) run in their place
                 [*GPU_TESTS, "tests/kernels/test_rope_kernel.py", "tests/kernels/test_adaln_kernel.py", "-k",
                  "not model"]),
            Step("bench-rope", 20, [PY, "benchmarks/rope.py", "--device", "cuda"],
                 [PY, "benchmarks/rope.py", "--device", "cpu", "--tokens", "96", "--text", "16", "--heads", "2",
                  "--repeats", "2"]),
            Step("bench-adaln", 20, [PY, "benchmarks/adaln.py", "--device", "cuda"],
                 [PY, "benchmarks/adaln.py", "--device", "cpu", "--tokens", "96", "--text", "16", "--hidden", "32",
                  "--repeats", "2"]),
            Step("bench-causal-pad", 15, [PY, "benchmarks/causal_pad.py", "--device", "cuda"],
                 [PY, "benchmarks/causal_pad.py", "--device", "cpu", "--repeats", "1"]),
            Step("step-bf16-vs-diffusers", 90,
                 [PY, "benchmarks/train_step.py", *FIVE_B_STEP, "--device", "cuda", "--compare-diffusers"],
                 [PY, "benchmarks/train_step.py", *TINY_STEP, "--device", "cpu", "--compare-diffusers"]),
            Step("step-packed", 45, [PY, "benchmarks/packing.py", "--device", "cuda", "--spatial-divisor", "1",
                                     "--text-length", "226", "--heads", "48", "--head-dim", "64", "--layers", "2",
                                     "--clips", "24", "--repeats", "2"],
                 [PY, "benchmarks/packing.py", "--device", "cpu", "--clips", "6", "--spatial-divisor", "8",
                  "--layers", "1", "--heads", "2", "--head-dim", "16", "--repeats", "1"]),
            Step("torchrun-save-resume", 55, torchrun_save_and_resume("cuda", run_dir),
                 torchrun_save_and_resume("cpu", run_dir)),
        ]
    if plan == "b":
        return [
            Step("install", 30, install_command(site)),
            Step("step-te-bf16", 75, [PY, "benchmarks/train_step.py", *FIVE_B_STEP, "--device", "cuda",
                                      "model.backend=te"], needs_te=True),
            Step("step-te-fp8", 75, [PY, "benchmarks/train_step.py", *FIVE_B_STEP, "--device", "cuda",
                                     "model.backend=te", "model.fp8=hybrid"], needs_te=True),
            Step("tests-te", 90, [PY, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                                  "tests/gpu/test_te_backend.py", "tests/gpu/test_te_packing.py"], needs_te=True),
            # one GPU: the TE-vs-local and FP8 tests run; CP=2 and CP=4 report their skip reason (GPUs they need)
            Step("te-context-parallel", 30, [PY, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                                             "tests/gpu/test_te_context_parallel.py"], needs_te=True),
        ]
    raise SystemExit(f"gpu_suite: --plan {plan!r}: use a or b")


# --- figures and targets ------------------------------------------------------------------------------------

def results_of(output: str) -> list[dict]:
    """The `RESULT {json}` lines a benchmark prints (benchmarks/timing.emit_result)."""
    return [json.loads(line[len("RESULT "):]) for line in output.splitlines() if line.startswith("RESULT {")]


def first(records: dict, step: str, **match) -> Optional[dict]:
    for result in records.get(step, {}).get("results", []):
        if all(result.get(key) == value for key, value in match.items()):
            return result
    return None


def targets(records: dict, plan: str) -> list[str]:
    """One line per target of the plan: met, missed or not run, with the figure."""
    def line(name: str, value: Optional[float], goal: float, unit: str, why_not: str) -> str:
        if value is None:
            return f"{name}: not run ({why_not})"
        return f"{name}: {'met' if value >= goal else 'missed'} ({value:.3g}{unit}; target >= {goal:g}{unit})"

    if plan == "b":
        bf16, fp8 = first(records, "step-te-bf16", kind="train_step"), first(records, "step-te-fp8", kind="train_step")
        return [line("TE FP8 step vs TE bf16 step", fp8["tflops"] / bf16["tflops"] if bf16 and fp8 else None, 1.15,
                     "x", "needs both TE steps on a GPU")]
    step = first(records, "step-bf16-vs-diffusers", kind="train_step")
    on_gpu = step is not None and step.get("device_type") == "cuda"
    lines = [line("bf16 step, model TFLOP/s", step["tflops"] if on_gpu else None, 500, "",
                  "no GPU step-bf16-vs-diffusers figure"),
             line("bf16 step vs diffusers in the same run", step.get("speedup") if on_gpu else None, 1.7, "x",
                  "no GPU step-bf16-vs-diffusers figure")]
    rope = first(records, "bench-rope", kind="rope", variant="triton (cogvx)")
    rope_on_gpu = rope is not None and rope.get("device_type") == "cuda"
    lines.append(line("RoPE (Triton) forward bandwidth, fraction of copy", rope["of_copy"] if rope_on_gpu else None,
                      0.8, "", "no GPU bench-rope figure"))
    tests = records.get("tests")
    passed = tests is not None and f"PASSED {MODEL_TEST}" in tests.get("output", "")
    failed = tests is not None and f"FAILED {MODEL_TEST}" in tests.get("output", "")
    lines.append("whole model in bf16 on the GPU vs the fp32 CPU reference: " + (
        "met (within the bf16 tolerance rule)" if passed else "missed (the test failed; see tests.log)" if failed
        else "not run (no GPU tests step that ran the model test)"))
    return lines


# --- running ------------------------------------------------------------------------------------------------

def rehearsal_shim(folder: Path) -> Path:
    """A sitecustomize that takes the editable install off the import path (its finder and path hook), so the
    rehearsal imports the project only from the target folder, as the GPU machine does."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in repr(f) and "
        "'_EditableFinder' not in repr(f)]\n"
        "sys.path_hooks[:] = [h for h in sys.path_hooks if 'Editable' not in repr(h)]\n"
        "sys.path[:] = [p for p in sys.path if '__editable__' not in p]\n")
    return folder


def step_environment(site: str, rehearse: bool, shim: Optional[Path]) -> dict:
    env = dict(os.environ)
    # PYTHONSAFEPATH keeps a script's own folder off sys.path too: the benchmarks import timing.py beside them
    paths = [site, str(ROOT / "benchmarks")] + ([str(shim)] if shim else []) + ([] if rehearse else [STAGED_SITE])
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONSAFEPATH"] = "1"  # `python -m` from the repository root must not import the source tree
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if rehearse:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def has_transformer_engine(env: dict) -> bool:
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('transformer_engine') else 1)"
    return subprocess.run([PY, "-c", probe], env=env, cwd=ROOT).returncode == 0


def write_records(out: Path, device: str, records: dict) -> None:
    """gpu_suite.json and gpu_suite.md as they stand (rewritten after every step)."""
    (out / "gpu_suite.json").write_text(json.dumps({"device": device, "steps": list(records.values())}, indent=1))
    lines = ["| step | status | exit | s | limit s | command |", "|---|---|---|---|---|---|"]
    for r in records.values():
        lines.append(f"| {r['step']} | {r['status']} | {r['exit']} | {r['seconds']} | {r['limit']} | "
                     f"`{' '.join(r['command'])[:200]}` |")
    for r in records.values():
        lines += ["", f"## {r['step']}", "", "```", r["output"][-6000:], "```"]
    (out / "gpu_suite.md").write_text("\n".join(lines) + "\n")


def run_plan(plan: str, rehearse: bool, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cogvx-rehearsal-" if rehearse else "cogvx-suite-"))
    site = str(work / "site") if rehearse else DEVICE_SITE
    shim = rehearsal_shim(work / "shim") if rehearse else None
    env = step_environment(site, rehearse, shim)
    # setuptools builds in a scratch folder: a build/lib in the checkout keeps every file it ever held (a module
    # since deleted or turned into a package would be installed again)
    (work / "distutils.cfg").write_text(f"[build]\nbuild_base = {work / 'build'}\n[egg_info]\negg_base = {work}\n")
    env["DIST_EXTRA_CONFIG"] = str(work / "distutils.cfg")
    if not rehearse:
        shutil.rmtree(site, ignore_errors=True)
    records: dict = {}
    device = "cpu rehearsal" if rehearse else "gpu"
    te = None
    try:
        for step in plan_steps(plan, site, str(out)):
            command = (step.rehearsal or step.command) if rehearse else step.command
            record = {"step": step.name, "limit": step.limit, "command": command}
            if step.needs_te and te is None:
                te = has_transformer_engine(env)
            if step.needs_te and not te:
                record.update(status="skipped", exit=0, seconds=0.0, results=[],
                              output="skipped: Transformer Engine is not installed here (plan b needs "
                                     "../shared/device/stage-gpu-deps.sh without --no-te)")
            else:
                started = time.perf_counter()
                try:
                    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, errors="replace", timeout=step.limit)
                    status, output = done.returncode, done.stdout
                except subprocess.TimeoutExpired as expired:
                    partial = expired.stdout or b""
                    output = (partial.decode(errors="replace") if isinstance(partial, bytes) else partial)
                    status, output = 124, output + f"\n[timed out after its limit of {step.limit} s]"
                record.update(status="ok" if status == 0 else "failed", exit=status,
                              seconds=round(time.perf_counter() - started, 1), results=results_of(output),
                              output=output)
            if step.name == "device" and record["exit"] == 0:
                device = record["output"].strip().splitlines()[-1]
            (out / f"{step.name}.log").write_text(record["output"])
            records[step.name] = record
            write_records(out, device, records)
            why = f" ({record['output'][len('skipped: '):]})" if record["status"] == "skipped" else ""
            print(f"[{step.name}] {record['status']} (exit {record['exit']}) in {record['seconds']} s "
                  f"of {step.limit} s{why}", flush=True)
            if step.name == "install" and record["exit"] != 0:
                print(record["output"][-3000:])
                break  # nothing else can run without the project
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    for target in targets(records, plan):
        print(target)
    failed = sum(r["status"] == "failed" for r in records.values())
    print(f"{failed} step(s) failed; {out}/gpu_suite.md")
    return failed


def print_budget() -> None:
    for plan in ("a", "b"):
        steps = plan_steps(plan, DEVICE_SITE, "/tmp/gpu-suite")
        for step in steps:
            print(f"plan {plan}  {step.name:<24} {step.limit:>4} s{'  (needs Transformer Engine)' if step.needs_te else ''}")
        print(f"plan {plan}: {sum(step.limit for step in steps)} s (cap {CAPS[plan]} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", choices=("a", "b"))
    parser.add_argument("--budget", action="store_true", help="print each step's limit and each plan's total")
    parser.add_argument("--rehearse", action="store_true", help="run the plan on this CPU at tiny shapes")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu-suite",
                        help="where the records go (default: $OUT, else /tmp/gpu-suite)")
    args = parser.parse_args()
    if args.budget:
        print_budget()
        return 0
    if not args.plan:
        parser.error("pass --plan a|b (or --budget)")
    return run_plan(args.plan, args.rehearse, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
