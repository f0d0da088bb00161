"""`cogvx scaling plan|run|fit SPEC`: scaling-law experiments over one spec file.

A spec (YAML) names a preset and overrides, the model sizes (a width list and a depth rule, or explicit sizes),
the token budgets, the global batch and a learning-rate rule:

    preset: tiny
    overrides: ["training.device=cpu"]
    run_root: runs/scaling/tiny
    models: {heads: [2, 4, 8], layers_per_head: 1.0}     # or sizes: [{num_layers: 2, num_attention_heads: 2}]
    tokens: [2.0e5, 4.0e5]                                 # training tokens per run (text + video)
    global_batch: 4
    lr: {base: 3.0e-3, base_hidden: 64, exponent: 1.0}     # lr = base x (base_hidden / hidden)^exponent
    warmup_fraction: 0.1
    final_window: 3                                         # the final loss: mean of the last N steps

`plan` prints every run (size, parameters, steps, tokens, compute). `run` trains them one after another, each
in its own folder under run_root, locally (`--nproc-per-node` ranks through torchrun) or as SLURM jobs (`--slurm`
with the launcher's flags); a finished run is not rerun and an unfinished one continues (`--resume auto`).
`fit` reads every run's final loss, or a CSV `params,tokens,loss` (`--table`), and fits

    L(N, D) = E + A / N^alpha + B / D^beta

(N: the non-embedding matrix parameters 12 L d^2, D: training tokens) by minimising a Huber loss of the log
residuals from a grid of starting points with L-BFGS, as Hoffmann et al. (2022) do; the compute-optimal
frontier for C = 6 N D follows: N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = (C/6) / N_opt, G = (alpha A /
(beta B))^(1/(alpha+beta)). It writes runs.csv, frontier.csv, fit.json and PNG plots.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from cogvx_mega.config.errors import ConfigError

logger = logging.getLogger(__name__)

FIT_NAMES = ("E", "A", "alpha", "B", "beta")


@dataclasses.dataclass
class ModelRule:
    heads: Optional[list[int]] = None
    """Widths: attention heads (hidden = heads x head_dim)."""
    head_dim: Optional[int] = None
    """Default: the preset's."""
    layers_per_head: Optional[float] = None
    """Depth rule: num_layers = max(1, round(layers_per_head x heads)); default: the preset's depth."""
    sizes: Optional[list[dict]] = None
    """Or explicit sizes: [{num_layers: L, num_attention_heads: H}, ...]."""


@dataclasses.dataclass
class LrRule:
    base: float = 1e-4
    base_hidden: int = 3072
    exponent: float = 1.0


@dataclasses.dataclass
class ScalingSpec:
    preset: str = "tiny"
    overrides: list = dataclasses.field(default_factory=list)
    run_root: str = "runs/scaling"
    models: ModelRule = dataclasses.field(default_factory=ModelRule)
    tokens: list = dataclasses.field(default_factory=list)
    global_batch: int = 8
    lr: LrRule = dataclasses.field(default_factory=LrRule)
    warmup_fraction: float = 0.1
    final_window: int = 5


@dataclasses.dataclass
class PlannedRun:
    name: str
    num_layers: int
    num_attention_heads: int
    hidden: int
    params: int
    tokens_per_sample: int
    steps: int
    tokens: int
    lr: float
    compute: float
    """Model training FLOPs of the whole run (cogvx_mega.model.flops)."""
    run_dir: str
    overrides: list


def _build(cls, values, where: str):
    if not isinstance(values, dict):
        raise ConfigError(where, values, "write a mapping")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}" if where else unknown[0], values[unknown[0]],
                          f"unknown field; known: {', '.join(known)}")
    nested = {"models": ModelRule, "lr": LrRule}
    return cls(**{k: _build(nested[k], v, f"{where}.{k}" if where else k) if k in nested else v
                  for k, v in values.items()})


def read_spec(path: str) -> ScalingSpec:
    import yaml

    if not Path(path).is_file():
        raise ConfigError("SPEC", path, "no such file")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError("SPEC", path, f"could not parse it: {error}") from None
    spec = _build(ScalingSpec, values, "")
    try:  # YAML 1.1 reads 5.0e4 (no sign in the exponent) as a string
        spec.tokens = [float(t) for t in spec.tokens] if isinstance(spec.tokens, list) else spec.tokens
    except (TypeError, ValueError):
        pass
    if not spec.tokens or not all(isinstance(t, (int, float)) and t > 0 for t in spec.tokens):
        raise ConfigError("tokens", spec.tokens, "give a list of positive token budgets, e.g. [1.0e9, 2.0e9]")
    rule = spec.models
    if (rule.sizes is None) == (rule.heads is None):
        raise ConfigError("models", dataclasses.asdict(rule), "give heads (and a depth rule) or sizes")
    if not isinstance(spec.global_batch, int) or spec.global_batch < 1:
        raise ConfigError("global_batch", spec.global_batch, "use a positive integer")
    if not isinstance(spec.final_window, int) or spec.final_window < 1:
        raise ConfigError("final_window", spec.final_window, "use a positive integer")
    if not 0 <= spec.warmup_fraction < 1:
        raise ConfigError("warmup_fraction", spec.warmup_fraction, "use a fraction in [0, 1)")
    return spec


def plan_runs(spec: ScalingSpec) -> list[PlannedRun]:
    """Every run of the spec, each config resolved and validated (a bad spec fails here, before anything runs)."""
    from cogvx_mega.config import load_config
    from cogvx_mega.model.flops import training_flops
    from cogvx_mega.model.transformer import sequence_length

    base = load_config(spec.preset, overrides=list(spec.overrides))
    rule = spec.models
    if rule.sizes is not None:
        sizes = []
        for size in rule.sizes:
            if set(size) - {"num_layers", "num_attention_heads"}:
                raise ConfigError("models.sizes", size, "write {num_layers: L, num_attention_heads: H}")
            sizes.append((int(size["num_layers"]), int(size["num_attention_heads"])))
    else:
        sizes = [(max(1, round(rule.layers_per_head * h)) if rule.layers_per_head else base.model.num_layers, int(h))
                 for h in rule.heads]
    runs = []
    for (layers, heads), budget in itertools.product(sizes, spec.tokens):
        head_dim = rule.head_dim or base.model.attention_head_dim
        hidden = heads * head_dim
        lr = spec.lr.base * (spec.lr.base_hidden / hidden) ** spec.lr.exponent
        model = [f"model.num_layers={layers}", f"model.num_attention_heads={heads}",
                 f"model.attention_head_dim={head_dim}"]
        config = load_config(spec.preset, overrides=[*spec.overrides, *model])
        m = config.model
        tokens_per_sample = sequence_length(m, *config.data.latent_shape(m), m.max_text_seq_length)
        steps = max(1, math.ceil(budget / (tokens_per_sample * spec.global_batch)))
        name = f"L{layers}-H{heads}x{head_dim}-D{budget:.3g}"
        run_dir = os.path.join(spec.run_root, name)
        overrides = [*spec.overrides, *model, f"training.steps={steps}", f"training.lr={lr:.6g}",
                     f"training.warmup_steps={int(spec.warmup_fraction * steps)}",
                     f"training.global_batch_size={spec.global_batch}", f"training.run_dir={run_dir}"]
        load_config(spec.preset, overrides=overrides)  # the whole run's config must validate
        runs.append(PlannedRun(name, layers, heads, hidden, 12 * layers * hidden * hidden, tokens_per_sample, steps,
                               steps * tokens_per_sample * spec.global_batch, lr,
                               steps * training_flops(m, [tokens_per_sample] * spec.global_batch), run_dir,
                               overrides))
    return runs


def describe_plan(runs: list[PlannedRun]) -> str:
    lines = [f"{'run':28} {'params':>12} {'steps':>7} {'tokens':>12} {'lr':>9} {'compute (FLOPs)':>16}"]
    for run in runs:
        lines.append(f"{run.name:28} {run.params:12,} {run.steps:7,} {run.tokens:12,} {run.lr:9.3g} "
                     f"{run.compute:16.4g}")
    lines.append(f"{len(runs)} runs, {sum(r.compute for r in runs):.4g} FLOPs in all")
    return "\n".join(lines)


def run_state(run: PlannedRun) -> str:
    """'finished', 'started' or 'new'."""
    metrics = Path(run.run_dir) / "metrics.jsonl"
    final = Path(run.run_dir) / "checkpoints" / f"step_{run.steps:08d}"
    if final.is_dir() and metrics.is_file():
        return "finished"
    return "started" if Path(run.run_dir).exists() else "new"


def run_all(spec: ScalingSpec, runs: list[PlannedRun], nproc_per_node: int = 1, slurm: Optional[list] = None,
            echo=print) -> dict[str, str]:
    """Train every run that is not finished; returns {run: what happened}."""
    outcome = {}
    for run in runs:
        state = run_state(run)
        if state == "finished":
            echo(f"{run.name}: finished, skipped")
            outcome[run.name] = "skipped"
            continue
        train = ["--preset", spec.preset, *run.overrides, "--resume", "auto"]
        if slurm is not None:
            command = [sys.executable, "-m", "cogvx_mega.cli", "launch", "slurm", *slurm,
                       "--job-name", f"scaling-{run.name}", "--", *train]
        elif nproc_per_node > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(nproc_per_node), "-m", "cogvx_mega.cli", "train", *train]
        else:
            command = [sys.executable, "-m", "cogvx_mega.cli", "train", *train]
        echo(f"{run.name}: {'continuing' if state == 'started' else 'starting'} ({run.steps} steps)")
        result = subprocess.run(command)
        if result.returncode != 0:
            raise ConfigError("run", run.name, f"exited with status {result.returncode}; see {run.run_dir} (rerun "
                                               f"`cogvx scaling run` to continue it)")
        outcome[run.name] = "submitted" if slurm is not None else "trained"
    return outcome


def final_loss(run: PlannedRun, window: int) -> Optional[float]:
    """Mean loss of the last `window` trained (not skipped) steps of a finished run; None otherwise."""
    if run_state(run) != "finished":
        return None
    rows = [json.loads(line) for line in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()]
    by_step = {row["step"]: row for row in rows if not row.get("skipped")}  # a resumed run may repeat steps
    losses = [by_step[step]["loss"] for step in sorted(by_step)][-window:]
    return sum(losses) / len(losses) if losses else None


# --- the fit ------------------------------------------------------------------------------------------------
def fit_scaling_law(rows: list[tuple[float, float, float]], huber_delta: float = 1e-3) -> dict[str, float]:
    """E, A, alpha, B, beta of L = E + A/N^alpha + B/D^beta over (params, tokens, loss) rows (Hoffmann et al.
    2022, approach 3)."""
    import numpy as np
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    if len(rows) < 5:
        raise ConfigError("runs", len(rows), "the fit has 5 parameters: give at least 5 finished runs or table rows")
    n, d, y = np.log(np.asarray(rows, dtype=np.float64)).T

    def objective(x):  # the Huber loss of the log residuals and its gradient
        a, b, e, alpha, beta = x
        terms = np.stack([a - alpha * n, b - beta * d, np.full_like(n, e)])
        predicted = logsumexp(terms, axis=0)
        weights = np.exp(terms - predicted)  # d predicted / d term
        r = predicted - y
        small = np.abs(r) <= huber_delta
        value = np.sum(np.where(small, 0.5 * r * r, huber_delta * (np.abs(r) - 0.5 * huber_delta)))
        slope = np.where(small, r, huber_delta * np.sign(r))
        gradient = np.array([np.sum(slope * weights[0]), np.sum(slope * weights[1]), np.sum(slope * weights[2]),
                             -np.sum(slope * weights[0] * n), -np.sum(slope * weights[1] * d)])
        return float(value), gradient

    # Hoffmann et al.'s grid of starting points, of which the 16 best start an L-BFGS descent
    grid = [np.array(start, dtype=np.float64) for start in itertools.product(
        np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5), np.arange(0, 2.5, 0.5),
        np.arange(0, 2.5, 0.5))]
    starts = sorted(grid, key=lambda x: objective(x)[0])[:16]
    best = None
    for start in starts:
        result = minimize(objective, start, jac=True, method="L-BFGS-B")
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return {"E": float(math.exp(e)), "A": float(math.exp(a)), "alpha": float(alpha), "B": float(math.exp(b)),
            "beta": float(beta)}


def predicted_loss(fit: dict, params: float, tokens: float) -> float:
    return fit["E"] + fit["A"] / params ** fit["alpha"] + fit["B"] / tokens ** fit["beta"]


def compute_optimal(fit: dict, compute: float) -> tuple[float, float]:
    """(N_opt, D_opt) for a budget of C = 6 N D FLOPs."""
    alpha, beta = fit["alpha"], fit["beta"]
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1 / (alpha + beta))
    n_opt = g * (compute / 6) ** (beta / (alpha + beta))
    return n_opt, compute / 6 / n_opt


def read_table(path: str) -> list[tuple[float, float, float]]:
    if not Path(path).is_file():
        raise ConfigError("--table", path, "no such file")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"params", "tokens", "loss"} <= set(reader.fieldnames):
            raise ConfigError("--table", path, "needs the columns params,tokens,loss")
        try:
            return [(float(r["params"]), float(r["tokens"]), float(r["loss"])) for r in reader]
        except ValueError as error:
            raise ConfigError("--table", path, f"has a value that is not a number ({error})") from None


def write_fit(rows: list[tuple[float, float, float]], fit: dict, out: Path) -> list[Path]:
    """runs.csv, frontier.csv, fit.json and two plots under `out` (each written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def atomic(name, write):
        path = out / name
        tmp = out / f".{name}.tmp{path.suffix}"
        write(tmp)
        os.replace(tmp, path)
        written.append(path)

    def runs_csv(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["params", "tokens", "loss", "predicted_loss", "compute_6nd"])
            for n, d, loss in rows:
                writer.writerow([f"{n:.6g}", f"{d:.6g}", f"{loss:.6g}", f"{predicted_loss(fit, n, d):.6g}",
                                 f"{6 * n * d:.6g}"])

    budgets = np.logspace(math.log10(min(6 * n * d for n, d, _ in rows)),
                          math.log10(max(6 * n * d for n, d, _ in rows)) + 2, 12)

    def frontier_csv(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["compute", "params_opt", "tokens_opt", "loss_opt"])
            for c in budgets:
                n_opt, d_opt = compute_optimal(fit, c)
                writer.writerow([f"{c:.6g}", f"{n_opt:.6g}", f"{d_opt:.6g}", f"{predicted_loss(fit, n_opt, d_opt):.6g}"])

    atomic("runs.csv", runs_csv)
    atomic("frontier.csv", frontier_csv)
    atomic("fit.json", lambda tmp: Path(tmp).write_text(json.dumps(fit, indent=2) + "\n"))

    def loss_plot(tmp):
        figure, axis = plt.subplots(figsize=(6, 4))
        for n in sorted({r[0] for r in rows}):
            points = sorted((d, loss) for m, d, loss in rows if m == n)
            compute = [6 * n * d for d, _ in points]
            axis.scatter(compute, [loss for _, loss in points], s=12)
            grid = np.logspace(math.log10(min(compute)), math.log10(max(compute)), 30)
            axis.plot(grid, [predicted_loss(fit, n, c / 6 / n) for c in grid], lw=1, label=f"N={n:.3g}")
        axis.set_xscale("log")
        axis.set_xlabel("compute 6ND (FLOPs)")
        axis.set_ylabel("final loss")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(tmp, format="png", dpi=120)
        plt.close(figure)

    def frontier_plot(tmp):
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.loglog(budgets, [compute_optimal(fit, c)[0] for c in budgets], label="N_opt")
        axis.loglog(budgets, [compute_optimal(fit, c)[1] for c in budgets], label="D_opt")
        axis.set_xlabel("compute (FLOPs)")
        axis.legend()
        figure.tight_layout()
        figure.savefig(tmp, format="png", dpi=120)
        plt.close(figure)

    atomic("loss_vs_compute.png", loss_plot)
    atomic("frontier.png", frontier_plot)
    return written


def finished_rows(spec: ScalingSpec, runs: list[PlannedRun]) -> list[tuple[float, float, float]]:
    """(params, tokens, final loss) of every finished run; an unfinished one is left out with a warning."""
    rows = []
    for run in runs:
        loss = final_loss(run, spec.final_window)
        if loss is None:
            logger.warning("%s is not finished: left out of the fit", run.name)
        else:
            rows.append((float(run.params), float(run.tokens), loss))
    return rows


def fit_and_write(rows: list[tuple[float, float, float]], out: Path) -> tuple[dict, list[Path]]:
    """The fitted law of `rows` and the files it wrote under `out` (runs.csv, frontier.csv, fit.json, plots)."""
    fit = fit_scaling_law(rows)
    return fit, write_fit(rows, fit, out)
