"""Throughput of `cogvx data split` and `cogvx data score --motion` on 6-second 720p H.264 clips, decode included.

    python benchmarks/curation.py                       # 4 distinct clips made once, 24 clip lines, 1 and 2 workers
    python benchmarks/curation.py --clips 48 --json
    python benchmarks/curation.py --device cuda         # DALI (NVDEC) decode on a GPU, where DALI is installed

The clips are made once into `--media` (kept between runs): 1280x720, 30 fps, 180 frames, x264 preset medium at
`--bitrate` (2.5 Mbit/s by default, a common bitrate for web video at 720p), a textured scene panned by the camera
with an object crossing it and sensor-like noise; every other clip has a hard cut to a second scene at frame 90.
The manifest lists `--clips` lines over links to those files (distinct paths, so no two lines share a decode).

What it times, each through the functions the commands run (`tools/data_curate.py`), progress bars off:
- decode_only: PyAV decode of every frame with the deblocking filter skipped, nothing else (the floor);
- split: shot detection (ContentDetector on every frame at 256 px wide);
- score_motion: Farneback motion of 2 frame pairs a second at a 128-px short side;
- split_motion: `split --motion`, both from one decode (what a curation run does);
- split_motion_every_frame: the same, decoding every frame (`--every-frame`: exact cut frames);
each with one worker thread (OpenCV held to one thread, one decoder thread per file) and with `--workers` threads,
and split_motion with `--workers` processes (one part each, `--part i/N`; their start-up CPU left out of the per-core
figure) to compare. Rates are clips per second of
wall time (`*_wall`) and, the per-core figure, clips per CPU-second of the process(es) (`*_per_core`: what one core
does when the process has it to itself; on a shared machine the wall figures move with the other load, these do
not). It also reports where the cuts were found (frames off the true cut) and what 35M clips take on 1,000 cores
at the one-core rate of split_motion.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT, FPS, FRAMES, CUT = 1280, 720, 30, 180, 90


def texture(rng, height: int, width: int) -> np.ndarray:
    """A natural-looking image: noise summed over several scales."""
    import cv2

    image = np.zeros((height, width, 3), np.float32)
    for scale in (4, 16, 64, 256):
        small = rng.normal(0, 1, (height // scale + 2, width // scale + 2, 3)).astype(np.float32)
        image += cv2.resize(small, (width + 2 * scale, height + 2 * scale),
                            interpolation=cv2.INTER_CUBIC)[:height, :width] * scale ** 0.5
    image = (image - image.min()) / (image.max() - image.min()) * 255
    return image.astype(np.uint8)


def make_clip(path: Path, seed: int, cut: bool, bitrate: int) -> None:
    import av

    rng = np.random.default_rng(seed)
    scenes = [(texture(rng, HEIGHT + 200, WIDTH + 400), texture(rng, 160, 160)) for _ in range(2 if cut else 1)]
    tmp = path.with_name(path.name + ".tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.bit_rate = bitrate
        stream.options = {"preset": "medium"}
        for t in range(FRAMES):
            background, thing = scenes[1 if cut and t >= CUT else 0]
            dy, dx = int(100 + 60 * np.sin(t / 40)), (2 * t) % 400
            image = background[dy:dy + HEIGHT, dx:dx + WIDTH].copy()
            y, x = int(300 + 150 * np.sin(t / 15)), (7 * t) % (WIDTH - 160)
            image[y:y + 160, x:x + 160] = thing
            image = np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def prepare(media: Path, distinct: int, clips: int, bitrate: int) -> tuple[Path, list[bool]]:
    """The distinct clips (made once) and a manifest of `clips` lines over links to them; which lines have a cut."""
    media.mkdir(parents=True, exist_ok=True)
    for i in range(distinct):
        path = media / f"clip{i}-{bitrate}.mp4"
        if not path.is_file():
            print(f"making {path.name} (6 s 720p H.264, once)", file=sys.stderr)
            make_clip(path, seed=i, cut=i % 2 == 1, bitrate=bitrate)
    links = Path(tempfile.mkdtemp(prefix="curation-bench-"))
    lines, cuts = [], []
    for n in range(clips):
        i = n % distinct
        link = links / f"line{n:05d}.mp4"
        os.symlink(media / f"clip{i}-{bitrate}.mp4", link)
        lines.append({"path": str(link), "caption": f"clip {n}", "kind": "video", "container": "mp4", "codec": "h264",
                      "fps": float(FPS), "frames": FRAMES, "width": WIDTH, "height": HEIGHT})
        cuts.append(i % 2 == 1)
    manifest = links / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest, cuts


def decode_only(manifest: Path, every_frame: bool) -> tuple[float, float]:
    import av

    started, cpu = time.perf_counter(), time.process_time()
    for line in manifest.read_text().splitlines():
        with av.open(json.loads(line)["path"]) as container:
            stream = container.streams.video[0]
            stream.thread_type, stream.thread_count = "NONE", 1
            stream.codec_context.options = {"skip_loop_filter": "all"}
            if not every_frame:
                stream.codec_context.skip_frame = "NONREF"
            for _ in container.decode(stream):
                pass
    return time.perf_counter() - started, time.process_time() - cpu


def timed(command: str, manifest: Path, workers: int, motion: bool, device: str,
          every_frame: bool = False) -> tuple[float, float, Path]:
    from cogvx_mega.data.shots import ShotOptions
    from cogvx_mega.tools.data_curate import MotionOptions, ScoreOptions, SplitOptions, score_manifest, split_manifest

    output = manifest.with_name(f"out-{command}-{workers}-{motion}-{every_frame}.jsonl")
    started, cpu = time.perf_counter(), time.process_time()
    if command == "split":
        split_manifest(str(manifest), str(output), SplitOptions(ShotOptions(), min_shot_seconds=1.0,
                                                                motion=MotionOptions() if motion else None,
                                                                every_frame=every_frame),
                       workers=workers, overwrite=True, device=device, progress=False)
    else:
        score_manifest(str(manifest), str(output), ScoreOptions(motion=MotionOptions(), every_frame=every_frame),
                       workers=workers, overwrite=True, device=device, progress=False)
    return time.perf_counter() - started, time.process_time() - cpu, output


def processes(manifest: Path, count: int, device: str) -> tuple[float, float]:
    """split --motion as `count` processes, one part each (the way ranks or array tasks run it)."""
    output = manifest.with_name(f"out-processes-{count}.jsonl")
    command = [sys.executable, "-m", "cogvx_mega.cli", "data", "split", str(manifest), "--output", str(output),
               "--min-shot-seconds", "1", "--motion", "--workers", "1", "--device", device]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    running = [subprocess.Popen([*command, "--part", f"{i}/{count}"], env=env, stdout=subprocess.DEVNULL)
               for i in range(count)]
    if any(process.wait() for process in running):
        raise SystemExit("a part failed")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return time.perf_counter() - started, cpu


def start_up(manifest: Path) -> float:
    """CPU-seconds of a part's process apart from its clips: the same command on a manifest of no clips."""
    empty = manifest.with_name("empty.jsonl")
    empty.write_text("")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "cogvx_mega.cli", "data", "split", str(empty), "--output",
                    str(manifest.with_name("out-empty.jsonl")), "--min-shot-seconds", "1", "--motion", "--workers",
                    "1", "--overwrite"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def cut_errors(output: Path, cuts: list[bool]) -> list[int]:
    """Frames between the found and the true cut, for every line with a cut (a missing or extra cut: None)."""
    shots: dict[str, list[dict]] = {}
    for line in output.read_text().splitlines():
        record = json.loads(line)
        shots.setdefault(record["path"], []).append(record)
    errors = []
    for n, (path, found) in enumerate(sorted(shots.items())):
        starts = [round(s["start"] * FPS) for s in found]
        if cuts[n]:
            errors.append(starts[1] - CUT if len(starts) == 2 else None)
        elif len(starts) != 1:
            errors.append(None)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=24, help="manifest lines timed")
    parser.add_argument("--distinct", type=int, default=4, help="distinct clips made")
    parser.add_argument("--bitrate", type=float, default=2.5e6)
    parser.add_argument("--media", default=str(Path(tempfile.gettempdir()) / "cogvx-curation-bench"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import cv2

    cv2.setNumThreads(1)
    manifest, cuts = prepare(Path(args.media), args.distinct, args.clips, int(args.bitrate))
    try:
        measure(args, manifest, cuts)
    finally:
        shutil.rmtree(manifest.parent, ignore_errors=True)


def measure(args, manifest: Path, cuts: list[bool]) -> None:
    size = os.path.getsize(Path(args.media) / f"clip0-{int(args.bitrate)}.mp4")
    result = {"clips": args.clips, "clip": f"{WIDTH}x{HEIGHT} {FPS} fps {FRAMES / FPS:.0f} s H.264",
              "bytes_per_clip": size, "device": args.device, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "loadavg_before": os.getloadavg()[0]}
    timed("split", manifest, 1, True, args.device)  # warm-up: imports, page cache
    if args.device == "cpu":
        for name, every in (("decode_only", False), ("decode_only_every_frame", True)):
            wall, cpu = decode_only(manifest, every)
            result[f"{name}_wall"], result[f"{name}_per_core"] = args.clips / wall, args.clips / cpu
    for name, command, motion, every in (("split", "split", False, False), ("score_motion", "score", True, False),
                                         ("split_motion", "split", True, False),
                                         ("split_motion_every_frame", "split", True, True)):
        wall, cpu, output = timed(command, manifest, 1, motion, args.device, every)
        result[f"{name}_wall"], result[f"{name}_per_core"] = args.clips / wall, args.clips / cpu
        if command == "split":
            result[f"{name}_cut_error_frames"] = sorted(set(cut_errors(output, cuts)), key=str)
        if args.workers > 1 and not every:
            wall, cpu, _ = timed(command, manifest, args.workers, motion, args.device)
            result[f"{name}_{args.workers}_threads_wall"] = args.clips / wall
            result[f"{name}_{args.workers}_threads_per_core"] = args.clips / cpu
    if args.workers > 1:
        wall, cpu = processes(manifest, args.workers, args.device)
        result["process_start_up_cpu_s"] = start_up(manifest)
        result[f"split_motion_{args.workers}_processes_wall"] = args.clips / wall
        result[f"split_motion_{args.workers}_processes_per_core"] = args.clips / (
            cpu - args.workers * result["process_start_up_cpu_s"])  # start-up left out: once per task, not per clip
    rate = result["split_motion_per_core"]
    result["hours_35M_clips_on_1000_cores"] = 35e6 / (rate * 1000) / 3600
    result["loadavg_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
        return
    for key, value in result.items():
        print(f"{key:>36}: {value:.2f}" if isinstance(value, float) else f"{key:>36}: {value}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
