"""`cogvx report`: the HTML page of a training run, checked as a real browser sees it.

The browser tests load the page in headless Chromium (Debian's `chromium` package) and read the DOM it built:
the SVG plots and their points, the bar chart's bars and values, the <video> elements and where their sources
lead, the count of skipped lines and the config text (with a `<script>` in it that must stay text). One test also
plays the sample videos in the browser: a copy of the page with a small script seeks every video and writes what
loaded into the DOM. Without Chromium those tests skip; the checks that need no browser always run."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional
from urllib.parse import urljoin, urlparse
from urllib.request import url2pathname

import pytest

from cogvx_mega.config.errors import ConfigError
from cogvx_mega.tools.report import build_report

TRAINING_STEPS = 20
SAMPLES = ["samples/step_00000002/sample_00.mp4", "samples/step_00000002/sample_01.mp4"]
MISSING_SAMPLE = "samples/step_00000002/sample_02.mp4"
ODD_SAMPLES = ["samples/step 2/clip #1.mp4", "samples/step 2/clip%41.mp4"]  # a URL must quote ' ', '#' and '%'
CONFIG_TEXT = "model:\n  name: tiny <script>document.title = 'hacked'</script>\ntraining:\n  lr: 0.001\n"
# the three validations: step 5 a row of its own without EMA, step 10 inside the training row, step 20 its own row
VALIDATIONS = {
    5: {"valid_loss": 1.6, "valid_loss_by_bin": [1.9 - 0.05 * k for k in range(10)]},
    10: {"valid_loss": 1.2, "valid_loss_ema": 1.3, "valid_loss_by_bin": [1.5 - 0.04 * k for k in range(10)],
         "valid_loss_ema_by_bin": [1.6 - 0.04 * k for k in range(10)]},
    20: {"valid_loss": 0.9, "valid_loss_ema": 1.0,
         "valid_loss_by_bin": [0.4, 1.3, 0.8, 1.1, 0.6, 0.9, 1.0, 0.7, 1.2, 0.5],
         "valid_loss_ema_by_bin": [0.5, 1.2, 0.9, 1.0, 0.7, 0.8, 1.1, 0.6, 1.3, 0.4]},
}
VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def chromium() -> Optional[str]:
    return shutil.which("chromium") or shutil.which("chromium-browser")


needs_browser = pytest.mark.skipif(chromium() is None, reason="no chromium: apt-get install chromium")


def write_sample_video(path: Path, seed: int) -> None:
    """5 frames of 32x32 H.264, as the trainer's sampler writes its videos."""
    import torch

    from cogvx_mega.vae.io import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [1, 3, T, H, W]
    write_video(str(path), video, fps=8)


def training_loss(step: int) -> float:
    return 3.0 * 0.8 ** step


def make_run(run_dir: Path, samples: list[str] = SAMPLES, config_text: str = CONFIG_TEXT) -> Path:
    """A run folder: 20 training rows (decreasing loss), 3 validations, samples at step 2 (those in `samples`
    are written, MISSING_SAMPLE is not), one line cut short mid-file, and config.yaml."""
    rows = [{"step": step, "loss": training_loss(step), "lr": 1e-3, "grad_norm": 1.0 + 0.05 * step}
            for step in range(1, TRAINING_STEPS + 1)]
    rows[1]["samples"] = [*samples, MISSING_SAMPLE]
    rows[9].update(VALIDATIONS[10])
    lines = [json.dumps(row) for row in rows]
    lines.insert(5, json.dumps({"step": 5, **VALIDATIONS[5]})[:30])  # a row cut short by a kill
    lines.insert(6, json.dumps({"step": 5, **VALIDATIONS[5]}))
    lines.append(json.dumps({"step": 20, **VALIDATIONS[20]}))
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    (run_dir / "config.yaml").write_text(config_text)
    for seed, sample in enumerate(samples):
        write_sample_video(run_dir / sample, seed)
    return run_dir


class Element:
    """One element of a parsed page: its tag, attributes, text (its children's included) and enclosing <svg>."""

    def __init__(self, tag: str, attributes: dict, svg: Optional["Element"]):
        self.tag, self.attributes, self.svg, self.text = tag, attributes, svg, ""


class PageParser(HTMLParser):
    """Every element of an HTML page, in document order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.open: list[Element] = []

    def handle_starttag(self, tag, attrs):
        svg = next((element for element in reversed(self.open) if element.tag == "svg"), None)
        element = Element(tag, dict(attrs), svg)
        self.elements.append(element)
        if tag not in VOID_ELEMENTS:
            self.open.append(element)

    def handle_endtag(self, tag):
        while self.open and self.open.pop().tag != tag:
            pass

    def handle_data(self, data):
        for element in self.open:
            element.text += data


def parse(page: str) -> list[Element]:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser.elements


def find(elements: list[Element], tag: str, css_class: Optional[str] = None, **attributes) -> list[Element]:
    """The `tag` elements of `css_class` (any when None) whose attributes have the given values (data_bin= for
    data-bin=)."""
    return [element for element in elements if element.tag == tag
            and (css_class is None or css_class in element.attributes.get("class", "").split())
            and all(element.attributes.get(name.replace("_", "-")) == value for name, value in attributes.items())]


def run_chromium(page: Path, profile: Path, virtual_time_ms: Optional[int] = None) -> str:
    """The DOM of `page` after load, as headless Chromium serialises it (after `virtual_time_ms` of virtual time
    when given: Chromium then also lets media load and timers run)."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
               "--no-first-run", "--disable-extensions", "--mute-audio"]
    if virtual_time_ms is not None:
        command.append(f"--virtual-time-budget={virtual_time_ms}")
    result = subprocess.run([*command, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-2000:]
    return result.stdout


def points_of(polyline: Element) -> list[tuple[float, float]]:
    return [tuple(map(float, point.split(","))) for point in polyline.attributes["points"].split()]


def video_files(elements: list[Element], page: Path) -> list[Path]:
    """The files the sources of the page's <video> elements lead to, resolved as a browser does (a '#' starts a
    fragment, %XX is a byte)."""
    urls = [urlparse(urljoin(page.as_uri(), video.attributes["src"])) for video in find(elements, "video")]
    assert all(url.scheme == "file" for url in urls)
    return [Path(url2pathname(url.path)).resolve() for url in urls]


@needs_browser
def test_page_as_the_browser_builds_it(tmp_path):
    run_dir = make_run(tmp_path / "run")
    report = build_report(str(run_dir))
    assert report == run_dir / "report.html"
    elements = parse(run_chromium(report, tmp_path / "profile"))

    # one polyline per series: loss, grad_norm, validation model and EMA
    lines = {line.attributes["data-series"]: line for line in find(elements, "polyline", "series")}
    assert sorted(lines) == ["EMA", "grad_norm", "loss", "model"]
    assert len(find(elements, "polyline")) == 4
    loss_points = points_of(lines["loss"])
    assert len(loss_points) == TRAINING_STEPS
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(loss_points, loss_points[1:]))  # y grows downwards
    assert len(points_of(lines["model"])) == 3 and len(points_of(lines["EMA"])) == 2
    assert lines["model"].svg is not lines["loss"].svg and lines["model"].svg is lines["EMA"].svg
    assert len(points_of(lines["grad_norm"])) == TRAINING_STEPS and lines["grad_norm"].svg is not lines["loss"].svg
    # the loss plot's numbered ticks cover the losses; every plot names its series in a legend
    loss_ticks = [float(tick.text) for tick in find(elements, "text", "y-tick") if tick.svg is lines["loss"].svg]
    assert min(loss_ticks) <= training_loss(TRAINING_STEPS) and max(loss_ticks) >= training_loss(1)
    legends = {tick.text for tick in find(elements, "text", "legend") if tick.svg is lines["model"].svg}
    assert legends == {"model", "EMA"}

    # the bar chart: 10 bars per series, the latest validation's values, heights in proportion to them
    bin_labels = [f"{100 * k}-{100 * k + 99}" for k in range(10)]
    for series, key in (("model", "valid_loss_by_bin"), ("EMA", "valid_loss_ema_by_bin")):
        bars = find(elements, "rect", "bar", data_series=series)
        assert [bar.attributes["data-bin"] for bar in bars] == bin_labels
        shown = [float(bar.text.rsplit(":", 1)[1]) for bar in bars]
        assert shown == pytest.approx(VALIDATIONS[20][key], rel=1e-5)
        heights = [float(bar.attributes["height"]) for bar in bars]
        assert sorted(range(10), key=heights.__getitem__) == sorted(range(10), key=shown.__getitem__)
        ratios = [height / value for height, value in zip(heights, shown)]
        assert max(ratios) == pytest.approx(min(ratios), rel=0.02)
    bar_svg = find(elements, "rect", "bar")[0].svg
    assert [tick.text for tick in find(elements, "text", "x-tick") if tick.svg is bar_svg] == bin_labels

    # two videos whose sources lead to the sample files; the missing one is named, not embedded
    videos = find(elements, "video")
    assert len(videos) == 2 and all({"controls", "muted", "loop"} <= set(video.attributes) for video in videos)
    assert video_files(elements, report) == [(run_dir / sample).resolve() for sample in SAMPLES]
    assert [missing.text for missing in find(elements, "p", "missing")] == [f"missing: {MISSING_SAMPLE}"]

    # the skipped line is counted; the config is there as text, its <script> never became an element
    assert [span.text for span in find(elements, "span", "skipped-lines")] == ["1"]
    assert [pre.text for pre in find(elements, "pre", "config")] == [CONFIG_TEXT]
    assert not find(elements, "script") and "hacked" not in find(elements, "title")[0].text


MEDIA_CHECK = """<script>
const results = {};
function report(name, outcome) {
  results[name] = outcome;
  document.getElementById('media-check').textContent = JSON.stringify(results);
}
const videos = Array.from(document.querySelectorAll('video'));
const broken = document.createElement('video');
broken.src = 'not_a_video.mp4';
document.body.appendChild(broken);
for (const video of [...videos, broken]) {
  const name = video.getAttribute('src');
  video.addEventListener('error', () => report(name, 'error ' + (video.error && video.error.code)));
  video.addEventListener('seeked', () => report(name, `decoded ${video.videoWidth}x${video.videoHeight} ` +
                                                     `${video.duration.toFixed(3)}s`));
  video.addEventListener('loadedmetadata', () => { video.currentTime = 0.3; });
  video.preload = 'auto';
  video.load();
}
</script>"""


@needs_browser
def test_sample_videos_play_in_the_browser(tmp_path):
    """A copy of the report (written outside the run folder, sample names that need quoting in a URL) with a
    script that seeks each <video> (so a frame is decoded) and writes the outcome into the page; a text file
    posing as a video is the control that must fail."""
    run_dir = make_run(tmp_path / "run", samples=ODD_SAMPLES)  # written elsewhere, names that need quoting
    report = build_report(str(run_dir), output=str(tmp_path / "pages" / "report.html"))
    (report.parent / "not_a_video.mp4").write_text("this is not a video\n")
    probe = report.with_name("media_check.html")
    probe.write_text(report.read_text().replace("</body>", f'<pre id="media-check"></pre>{MEDIA_CHECK}</body>'))
    dom = run_chromium(probe, tmp_path / "profile", virtual_time_ms=5000)
    results = json.loads(html.unescape(re.search(r'<pre id="media-check">(.*?)</pre>', dom, re.S).group(1)))
    sources = [video.attributes["src"] for video in find(parse(report.read_text()), "video")]
    assert len(sources) == 2 and set(results) == {*sources, "not_a_video.mp4"}, results
    for source in sources:
        decoded = re.fullmatch(r"decoded 32x32 ([0-9.]+)s", results[source])
        assert decoded and float(decoded.group(1)) == pytest.approx(5 / 8, abs=1 / 8), results  # 5 frames at 8 fps
    assert results["not_a_video.mp4"].startswith("error"), results


def test_a_folder_without_metrics_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(ConfigError, match="no metrics.jsonl there") as raised:
        build_report(str(tmp_path))
    assert raised.value.field_name == "RUN_DIR"
    assert not (tmp_path / "report.html").exists()


def test_a_report_written_elsewhere_finds_the_videos(tmp_path):
    run_dir = make_run(tmp_path / "runs" / "a", samples=ODD_SAMPLES)
    report = build_report(str(run_dir), output=str(tmp_path / "reports" / "deep" / "a.html"))
    elements = parse(report.read_text())
    assert all(video.attributes["src"].startswith("../../runs/a/samples/") for video in find(elements, "video"))
    assert video_files(elements, report) == [(run_dir / sample).resolve() for sample in ODD_SAMPLES]
    with pytest.raises(ConfigError, match="already exists"):
        build_report(str(run_dir), output=str(report), overwrite=False)


def test_text_from_the_run_is_escaped(tmp_path):
    hostile = "<script>alert(1)</script>"
    run_dir = make_run(tmp_path / "run", samples=[], config_text=f"model:\n  name: '{hostile}'\n")
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"step": 21, "loss": 0.1, "samples": [f"samples/{hostile}.mp4"]}) + "\n")
    page = build_report(str(run_dir)).read_text()
    assert "<script" not in page and page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2
    assert [pre.text for pre in find(parse(page), "pre", "config")] == [(run_dir / "config.yaml").read_text()]


def test_rows_with_nothing_but_a_step(tmp_path):
    """Rows may lack every key but `step`: the page says what is missing instead of drawing empty plots."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "loss": NaN}\n')
    page = build_report(str(run_dir)).read_text()
    assert not find(parse(page), "svg") and not find(parse(page), "video")
    for expected in ("No training loss rows", "No validation rows yet", "No samples", "No config.yaml"):
        assert expected in page
