"""`cogvx report RUN_DIR`: one self-contained HTML page about a training run, to open in any browser.

The page shows the training loss (and the gradient norm) against the step, the validation loss of the model and of
its EMA, the latest validation's loss per timestep bin, the sample videos of every step that made them and the
run's config.yaml. Plots are inline SVG drawn here and the page loads nothing from anywhere (no scripts, no fonts),
so it opens on a cluster's login node or from an archive years later. Video sources are relative to the page's
folder, so a report written outside the run folder still finds them.

metrics.jsonl rows are merged by step: a validation row may be a row of its own (`step`, `valid_loss`, ...) or
keys of the step's training row. A line that does not parse (a row cut short by a kill) is skipped and counted.
"""
from __future__ import annotations

import dataclasses
import html
import json
import math
import os
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from cogvx_mega.checkpoint.atomic import write_text_atomically
from cogvx_mega.config.errors import ConfigError, refuse_existing_output
from cogvx_mega.files import video_files

METRICS_FILE = "metrics.jsonl"  # as cogvx_mega.training.metrics writes it (not imported: that module needs torch)
CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.html"
TRAIN_TIMESTEPS = 1000  # n bins of valid_loss_by_bin cut 0..999 evenly (training.valid_bins)
MARKED_POINTS = 50  # a series of at most this many points also gets a dot per point
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 720, 320, 70, 20, 30, 50  # SVG size and plot margins, in pixels
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:60em} svg{display:block;margin:1em 0} "
         "video{max-width:256px;margin:.5em;background:#000} pre{background:#f4f4f4;padding:1em;overflow:auto} "
         ".missing{color:#b00}")


@dataclasses.dataclass(frozen=True)
class Series:
    """One named line of a plot (x, y points) or one named group of bars (y values)."""
    name: str
    values: list


@dataclasses.dataclass(frozen=True)
class Axis:
    """A value range drawn between two pixel positions, linear or log10."""
    low: float
    high: float
    start: float
    end: float
    log: bool = False

    def pixel(self, value: float) -> float:
        to_scale = math.log10 if self.log else float
        fraction = (to_scale(value) - to_scale(self.low)) / (to_scale(self.high) - to_scale(self.low))
        return round(self.start + fraction * (self.end - self.start), 2)


def is_number(value) -> bool:
    """A finite int or float (not a bool): what a plot can place."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: Path) -> tuple[dict[int, dict], int]:
    """The rows of metrics.jsonl merged per step (later keys win), and how many lines were skipped because they
    are not a JSON object with an integer `step`."""
    rows: dict[int, dict] = {}
    skipped = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            skipped += 1
            continue
        rows.setdefault(step, {}).update(row)
    return dict(sorted(rows.items())), skipped


def points_of(rows: dict[int, dict], key: str) -> list[tuple[float, float]]:
    """(step, value) of every step whose `key` is a finite number."""
    return [(step, row[key]) for step, row in rows.items() if is_number(row.get(key))]


def padded_range(values: list[float], log: bool) -> tuple[float, float]:
    """(min, max) of `values`, widened around a single value so that an axis has a length."""
    low, high = min(values), max(values)
    if high > low:
        return low, high
    return (low / 2, high * 2) if log else (low - (abs(low) * 0.1 or 1.0), high + (abs(high) * 0.1 or 1.0))


def linear_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) from just below `low` to just above `high`."""
    raw_step = (high - low) / count
    magnitude = 10.0 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first, last = math.floor(low / step), math.ceil(high / step)
    return [round(i * step, 12) for i in range(first, last + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    """1, 2 and 5 times powers of ten from just below `low` to just above `high` (powers of ten alone when those
    would be more than 8 ticks)."""
    exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for multiples in ((1, 2, 5), (1,)):
        candidates = [float(f"{m}e{e}") for e in exponents for m in multiples]
        start = max(c for c in candidates if c <= low)
        end = min(c for c in candidates if c >= high)
        ticks = [c for c in candidates if start <= c <= end]
        if len(ticks) <= 8:
            break
    return ticks


def label(value: float) -> str:
    """A tick's number: whole numbers (steps) in full, others to three significant digits."""
    return str(int(value)) if value == int(value) and abs(value) < 1e6 else f"{value:.3g}"


def axes_svg(x_ticks: list[float], y_ticks: list[float], x_axis: Optional[Axis], y_axis: Axis,
             x_label: str, y_label: str) -> list[str]:
    """The frame, the y ticks with their numbers and grid lines, the x ticks (when `x_axis`) and the axis names."""
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" fill="none" stroke="#444"/>']
    for tick in y_ticks:
        y = y_axis.pixel(tick)
        parts.append(f'<line x1="{LEFT}" x2="{right}" y1="{y}" y2="{y}" stroke="#ddd"/>'
                     f'<text class="y-tick" x="{LEFT - 6}" y="{y + 4}" text-anchor="end">{label(tick)}</text>')
    for tick in x_ticks if x_axis else []:
        x = x_axis.pixel(tick)
        parts.append(f'<line x1="{x}" x2="{x}" y1="{bottom}" y2="{bottom + 5}" stroke="#444"/>'
                     f'<text class="x-tick" x="{x}" y="{bottom + 18}" text-anchor="middle">{label(tick)}</text>')
    parts.append(f'<text x="{(LEFT + right) / 2}" y="{HEIGHT - 8}" text-anchor="middle">{html.escape(x_label)}</text>'
                 f'<text transform="translate(14 {(TOP + bottom) / 2}) rotate(-90)" text-anchor="middle">'
                 f'{html.escape(y_label)}</text>')
    return parts


def legend_svg(names: list[str]) -> list[str]:
    """A colour swatch and the name of each series, one under the other, top right inside the plot."""
    return [f'<rect x="{WIDTH - RIGHT - 150}" y="{TOP + 3 + 16 * index}" width="12" height="10" '
            f'fill="{COLOURS[index]}"/><text class="legend" x="{WIDTH - RIGHT - 132}" y="{TOP + 12 + 16 * index}">'
            f'{html.escape(name)}</text>'
            for index, name in enumerate(names)]


def svg_document(title: str, parts: list[str]) -> str:
    """An inline <svg> of the drawn `parts`; `title` is what a screen reader (and a hover) says of it."""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img" '
            f'font-size="11"><title>{html.escape(title)}</title>{"".join(parts)}</svg>')


def line_plot(title: str, series: list[Series], x_label: str, y_label: str, log_y: bool = False) -> str:
    """An SVG plot of (x, y) series: one polyline each, ticks with numbers, a legend. `log_y` is honoured when every
    y is positive and they span more than a decade (a loss early in training); else the y axis is linear."""
    xs = [x for line in series for x, _ in line.values]
    ys = [y for line in series for _, y in line.values]
    log_y = log_y and min(ys) > 0 and max(ys) > 10 * min(ys)
    x_ticks = linear_ticks(*padded_range(xs, log=False))
    y_ticks = (log_ticks if log_y else linear_ticks)(*padded_range(ys, log=log_y))
    x_axis = Axis(x_ticks[0], x_ticks[-1], LEFT, WIDTH - RIGHT)
    y_axis = Axis(y_ticks[0], y_ticks[-1], HEIGHT - BOTTOM, TOP, log=log_y)
    parts = axes_svg(x_ticks, y_ticks, x_axis, y_axis, x_label, y_label + (" (log scale)" if log_y else ""))
    for index, line in enumerate(series):
        pixels = [(x_axis.pixel(x), y_axis.pixel(y)) for x, y in line.values]
        points = " ".join(f"{x},{y}" for x, y in pixels)
        parts.append(f'<polyline class="series" data-series="{html.escape(line.name)}" fill="none" '
                     f'stroke="{COLOURS[index]}" stroke-width="1.5" points="{points}"/>')
        if len(pixels) <= MARKED_POINTS:  # a few points (validations) get dots too: one point draws no line
            parts += [f'<circle cx="{x}" cy="{y}" r="3" fill="{COLOURS[index]}"/>' for x, y in pixels]
    return svg_document(title, parts + legend_svg([line.name for line in series]))


def bar_chart(title: str, bin_labels: list[str], series: list[Series], y_label: str) -> str:
    """An SVG bar chart: per bin, one bar per series side by side; each bar's value is in its <title> tooltip."""
    finite = [v for group in series for v in group.values if is_number(v)] or [0.0]
    y_ticks = linear_ticks(*padded_range([min(0.0, *finite), max(0.0, *finite)], log=False))
    y_axis = Axis(y_ticks[0], y_ticks[-1], HEIGHT - BOTTOM, TOP)
    group_width = (WIDTH - RIGHT - LEFT) / len(bin_labels)
    bar_width = group_width * 0.8 / len(series)
    parts = axes_svg([], y_ticks, None, y_axis, "timestep bin", y_label)
    for bin_index, bin_label in enumerate(bin_labels):
        group_left = LEFT + bin_index * group_width + group_width * 0.1
        parts.append(f'<text class="x-tick" x="{group_left + group_width * 0.4:.2f}" y="{HEIGHT - BOTTOM + 16}" '
                     f'text-anchor="middle">{bin_label}</text>')
        for index, group in enumerate(series):
            value = group.values[bin_index] if bin_index < len(group.values) else float("nan")
            top, base = (y_axis.pixel(value), y_axis.pixel(0.0)) if is_number(value) else (0.0, 0.0)
            shown = f"{value:.6g}" if isinstance(value, (int, float)) else html.escape(repr(value))
            parts.append(f'<rect class="bar" data-series="{html.escape(group.name)}" data-bin="{bin_label}" '
                         f'x="{group_left + index * bar_width:.2f}" y="{min(top, base)}" width="{bar_width:.2f}" '
                         f'height="{abs(base - top):.2f}" fill="{COLOURS[index]}"><title>'
                         f'{html.escape(group.name)}, timesteps {bin_label}: {shown}</title></rect>')
    return svg_document(title, parts + legend_svg([group.name for group in series]))


def training_section(rows: dict[int, dict]) -> str:
    """The training loss against the step and, in a plot of its own (another scale), the gradient norm."""
    loss = points_of(rows, "loss")
    if not loss:
        return "<p>No training loss rows.</p>"
    page = line_plot("training loss", [Series("loss", loss)], "step", "loss", log_y=True)
    grad_norm = points_of(rows, "grad_norm")
    if grad_norm:
        page += line_plot("gradient norm", [Series("grad_norm", grad_norm)], "step", "gradient norm")
    return page


def validation_section(rows: dict[int, dict]) -> str:
    """The validation loss against the step (model and EMA) and the latest validation's loss per timestep bin."""
    series = [Series(name, points_of(rows, key)) for name, key in (("model", "valid_loss"), ("EMA", "valid_loss_ema"))]
    series = [line for line in series if line.values]
    page = line_plot("validation loss", series, "step", "validation loss", log_y=True) if series else ""
    return (page + timestep_bins_section(rows)) or "<p>No validation rows yet.</p>"


def timestep_bins_section(rows: dict[int, dict]) -> str:
    """The loss per timestep bin of the latest step that has it, model and EMA side by side ("" when none has)."""
    keys = (("model", "valid_loss_by_bin"), ("EMA", "valid_loss_ema_by_bin"))
    binned = [step for step, row in rows.items() if any(isinstance(row.get(key), list) and row[key] for _, key in keys)]
    if not binned:
        return ""
    latest = rows[binned[-1]]
    groups = [Series(name, latest[key]) for name, key in keys if isinstance(latest.get(key), list) and latest[key]]
    count = max(len(group.values) for group in groups)
    width = TRAIN_TIMESTEPS // count
    bin_labels = [f"{k * width}-{(k + 1) * width - 1}" for k in range(count)]
    return (f"<h3>Loss per timestep bin at step {binned[-1]}</h3>"
            + bar_chart(f"validation loss per timestep bin, step {binned[-1]}", bin_labels, groups, "loss"))


def samples_section(rows: dict[int, dict], run_dir: Path, page_folder: Path) -> str:
    """The sample videos of every step that made some, in step order."""
    blocks = []
    for step, row in rows.items():
        listed = row.get("samples")
        samples = video_files(listed) if isinstance(listed, list) else []
        if samples:
            blocks.append(f"<h3>Step {step}</h3>" + "".join(sample_item(s, run_dir, page_folder) for s in samples))
    return "".join(blocks) or "<p>No samples.</p>"


def sample_item(sample: str, run_dir: Path, page_folder: Path) -> str:
    """A <video> of the file `sample` (relative to the run folder) whose source is relative to the page's folder,
    so the page finds it wherever it is written; a file that is not there is named, not embedded."""
    file = run_dir / sample
    if not file.is_file():
        return f'<p class="missing">missing: {html.escape(sample)}</p>'
    source = quote(Path(os.path.relpath(file.resolve(), page_folder.resolve())).as_posix())
    return (f'<figure><video controls muted loop preload="metadata" src="{html.escape(source)}"></video>'
            f"<figcaption>{html.escape(sample)}</figcaption></figure>")


def config_section(run_dir: Path) -> str:
    """The run's config.yaml as text, folded away (it is long) until opened."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return f"<p>No {CONFIG_FILE} in the run folder.</p>"
    return (f"<details><summary>{CONFIG_FILE}</summary><pre class=\"config\">"
            f"{html.escape(path.read_text(errors='replace'))}</pre></details>")


def report_page(run_dir: Path, page_folder: Path) -> str:
    """The whole HTML page of the run in `run_dir`, its links relative to `page_folder`."""
    rows, skipped = read_metrics(run_dir / METRICS_FILE)
    name = html.escape(run_dir.resolve().name)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Run {name}</title>'
            f"<style>{STYLE}</style></head><body><h1>Run {name}</h1>"
            f"<p>{html.escape(str(run_dir.resolve()))}</p>"
            f'<p class="metrics-summary">{METRICS_FILE}: {len(rows)} steps, '
            f'<span class="skipped-lines">{skipped}</span> malformed line{"" if skipped == 1 else "s"} skipped</p>'
            f"<h2>Training</h2>{training_section(rows)}"
            f"<h2>Validation</h2>{validation_section(rows)}"
            f"<h2>Samples</h2>{samples_section(rows, run_dir, page_folder)}"
            f"<h2>Config</h2>{config_section(run_dir)}</body></html>\n")


def build_report(run_dir: str, output: Optional[str] = None, overwrite: bool = True) -> Path:
    """Write the HTML report of the training run in `run_dir` to `output` (default RUN_DIR/report.html), whole
    or not at all; returns its path. A folder without metrics.jsonl is refused, as is an existing `output`
    unless `overwrite`."""
    folder = Path(run_dir)
    if not (folder / METRICS_FILE).is_file():
        raise ConfigError("RUN_DIR", run_dir, f"no {METRICS_FILE} there; pass a training run's folder")
    target = Path(output) if output is not None else folder / REPORT_FILE
    refuse_existing_output("--output", target, overwrite)
    return write_text_atomically(target, report_page(folder, target.parent))
