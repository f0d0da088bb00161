"""`cogvx scaling plan|run|fit SPEC`: scaling-law experiments over one spec file (tools/scaling.py)."""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

NAME = "scaling"
HELP = "scaling-law experiments: plan, run and fit a sweep of model sizes and token budgets"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("plan", "run", "fit"))
    parser.add_argument("spec", nargs="?", help="the scaling spec (YAML); fit --table needs none")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="run: ranks per run, through torchrun")
    parser.add_argument("--slurm", metavar="FLAGS",
                        help="run: submit each run with `cogvx launch slurm FLAGS` (e.g. --slurm '--nodes 1 "
                             "--gpus-per-node 8 --time 04:00:00')")
    parser.add_argument("--table", help="fit: a CSV with params,tokens,loss instead of the spec's runs")
    parser.add_argument("--out", help="fit: the folder for runs.csv, frontier.csv, fit.json and the plots "
                                      "(default: the spec's run_root/fit, or beside the table)")
    parser.add_argument("--json", action="store_true", help="fit: print the fitted E, A, alpha, B, beta as JSON")


def run(args: argparse.Namespace) -> int:
    from cogvx_mega.config.errors import ConfigError, check_writable
    from cogvx_mega.tools import scaling

    if args.action == "fit" and args.table:
        rows = scaling.read_table(args.table)
        out = Path(args.out or Path(args.table).with_suffix("")).resolve()
        check_writable("--out", out, folder=True)  # before the fit
    else:
        if not args.spec:
            raise ConfigError("SPEC", None, f"`cogvx scaling {args.action}` needs the spec file")
        spec = scaling.read_spec(args.spec)
        out = Path(args.out or Path(spec.run_root) / "fit")
        if args.action == "run":  # where the runs go, before any is planned or trained
            check_writable("run_root", spec.run_root, folder=True)
        elif args.action == "fit":
            check_writable("--out", out, folder=True)
        runs = scaling.plan_runs(spec)
        if args.action == "plan":
            print(scaling.describe_plan(runs))
            return 0
        if args.action == "run":
            slurm = shlex.split(args.slurm) if args.slurm else None
            scaling.run_all(spec, runs, nproc_per_node=args.nproc_per_node, slurm=slurm)
            return 0
        rows = scaling.finished_rows(spec, runs)
    fit, written = scaling.fit_and_write(rows, out)
    if args.json:
        print(json.dumps(fit))
    else:
        print(" ".join(f"{name}={fit[name]:.4g}" for name in scaling.FIT_NAMES))
        print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
