"""`cogvx scaling`: the fit recovers E, A, alpha, B, beta of synthetic losses (0.1% noise) within 5% and the
compute-optimal frontier's exponent; `plan` sizes every run from the spec; `run` trains them, continues an
unfinished one and does not rerun finished ones; a spec with an unknown field, or a fit of too few runs, is
one line, exit 2, nothing written."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from cogvx_mega.cli import EXIT_USER_ERROR, main

TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}


def test_the_fit_recovers_known_exponents_and_the_frontier(tmp_path, capsys):
    rng = np.random.default_rng(0)
    table = tmp_path / "losses.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["params", "tokens", "loss"])
        for n in np.logspace(6, 9, 6):
            for d in np.logspace(8, 11, 6):
                loss = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
                writer.writerow([n, d, loss * (1 + 0.001 * rng.standard_normal())])
    out = tmp_path / "fit"
    assert main(["scaling", "fit", "--table", str(table), "--out", str(out), "--json"]) == 0
    fit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name, value in TRUE.items():
        assert fit[name] == pytest.approx(value, rel=0.05), name
    assert json.loads((out / "fit.json").read_text()) == fit
    for name in ("runs.csv", "loss_vs_compute.png", "frontier.png"):
        assert (out / name).stat().st_size > 0
    frontier = list(csv.DictReader(open(out / "frontier.csv")))
    first, last = frontier[0], frontier[-1]
    slope = (math.log(float(last["params_opt"])) - math.log(float(first["params_opt"]))) / (
        math.log(float(last["compute"])) - math.log(float(first["compute"])))
    assert slope == pytest.approx(TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), rel=0.05)
    for row in frontier:  # C = 6 N D on the frontier
        assert 6 * float(row["params_opt"]) * float(row["tokens_opt"]) == pytest.approx(float(row["compute"]), rel=1e-4)


def write_spec(tmp_path, **extra):
    import yaml

    spec = {"preset": "tiny", "overrides": ["data.num_synthetic_clips=4", "training.micro_batch_size=1"],
            "run_root": str(tmp_path / "runs"), "models": {"heads": [2, 4], "layers_per_head": 1.0},
            "tokens": [512], "global_batch": 2, "lr": {"base": 3.0e-3, "base_hidden": 64, "exponent": 1.0},
            "final_window": 2, **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_plan_run_resume_and_no_rerun(tmp_path, capsys):
    from cogvx_mega.model.flops import training_flops
    from cogvx_mega.tools.scaling import plan_runs, read_spec

    spec_file = write_spec(tmp_path)
    assert main(["scaling", "plan", str(spec_file)]) == 0
    printed = capsys.readouterr().out
    runs = plan_runs(read_spec(str(spec_file)))
    assert [r.name for r in runs] == ["L2-H2x16-D512", "L4-H4x16-D512"]
    for run in runs:  # 64 tokens per sample (16 text + 3x4x4 video), 2 samples per step
        assert run.tokens_per_sample == 64 and run.steps == 4 and run.tokens == 512
        assert run.lr == pytest.approx(3.0e-3 * 64 / run.hidden)
        assert run.name in printed
    assert runs[0].params == 12 * 2 * 32 * 32

    # an unfinished run: trained to step 1 by hand; `run` continues it and trains the other
    first = runs[0]
    subprocess.run([sys.executable, "-m", "cogvx_mega.cli", "train", "--preset", "tiny",
                    *[o for o in first.overrides if not o.startswith("training.steps")], "training.steps=1"],
                   check=True, capture_output=True)
    assert main(["scaling", "run", str(spec_file)]) == 0
    printed = capsys.readouterr().out
    assert "L2-H2x16-D512: continuing" in printed and "L4-H4x16-D512: starting" in printed
    for run in runs:
        rows = [json.loads(line) for line in open(f"{run.run_dir}/metrics.jsonl")]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
    stamps = [(tmp_path / "runs" / r.name / "metrics.jsonl").stat().st_mtime_ns for r in runs]
    assert main(["scaling", "run", str(spec_file)]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 2
    assert [(tmp_path / "runs" / r.name / "metrics.jsonl").stat().st_mtime_ns for r in runs] == stamps

    # compute of a run: steps x the model FLOPs of a step
    from cogvx_mega.config import load_config

    config = load_config("tiny", overrides=[o for o in first.overrides if o.startswith("model.")])
    assert first.compute == pytest.approx(4 * training_flops(config.model, [64, 64]))

    # two finished runs are too few for a five-parameter fit
    assert main(["scaling", "fit", str(spec_file)]) == EXIT_USER_ERROR
    assert "at least 5" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "fit").exists()


def test_run_through_the_slurm_launcher_makes_one_job_per_run(tmp_path, capfd):
    spec_file = write_spec(tmp_path)
    assert main(["scaling", "run", str(spec_file), "--slurm", "--nodes 1 --gpus-per-node 2 --time 01:00:00 "
                                                              "--dry-run"]) == 0
    out = capfd.readouterr().out
    assert out.count("#!/bin/bash") == 2
    for name in ("L2-H2x16-D512", "L4-H4x16-D512"):
        assert f"#SBATCH --job-name=scaling-{name}" in out
        assert f"--run-dir {tmp_path / 'runs' / name}" in out
    assert "--nproc-per-node 2" in out and "training.global_batch_size=2" in out


@pytest.mark.parametrize("extra, needle", [({"learning_rate": 1.0}, "learning_rate"),
                                            ({"models": {"heads": [2], "depth": 3}}, "models.depth"),
                                            ({"tokens": []}, "tokens")])
def test_a_bad_spec_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, extra, needle):
    spec_file = write_spec(tmp_path, **extra)
    assert main(["scaling", "run", str(spec_file)]) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and needle in error[0], error
    assert not (tmp_path / "runs").exists()
