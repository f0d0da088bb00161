"""Throughput of the data path's decoders: frames/s decoded for training (sampled at 8 fps, resized and
cropped) by PyAV (1 and N threads), DALI's CPU decoder and, on a GPU, DALI with NVDEC. (Encode clips/s and
reader samples/s against a training step are still to be added.)

    python benchmarks/data_throughput.py                       # CPU: PyAV (1 and N threads), DALI-CPU
    python benchmarks/data_throughput.py --device cuda         # adds DALI-GPU (NVDEC) and the GPU step

Clips are generated moving shapes encoded with real codecs (H.264 in MP4 for PyAV and NVDEC, VP9 in WebM
for DALI's CPU decoder, which refuses H.264), `--clips` of each at `--size`, `--frames` frames at 24 fps,
decoded at 8 fps into 1 + 4k frames as training does. Each figure is the median of `--repeats` passes.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def make_clips(folder: Path, count: int, frames: int, height: int, width: int) -> list[dict]:
    from cogvx_mega.data.manifest import find_media, scan
    from cogvx_mega.data.synthetic import random_clip_spec, render_clip_uint8, write_video_file

    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        spec = random_clip_spec(generator)
        pixels = render_clip_uint8(spec, frames, height, width)
        for name, codec in ((f"h264_{index}.mp4", "libx264"), (f"vp9_{index}.webm", "libvpx-vp9")):
            write_video_file(folder / name, pixels, 24, codec, "yuv420p")
            (folder / name).with_suffix(".txt").write_text(spec.caption)
    records, failures = scan(find_media(folder), progress=False)
    assert not failures, failures
    return [vars(r) for r in records]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=72, help="source frames at 24 fps (72: 3 s, 25 frames at 8 fps)")
    parser.add_argument("--size", default="480x720")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from cogvx_mega.data.decode import DecodeSpec, dali_available, decode_clip

    height, width = map(int, args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="cogvx-data-bench-"))
    records = make_clips(work, args.clips, args.frames, height, width)
    h264 = [r for r in records if r["codec"] == "h264"]
    vp9 = [r for r in records if r["codec"] == "vp9"]
    spec = DecodeSpec(frames=25, height=height, width=width, fps=8)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    print(f"device: {device}, {os.cpu_count()} cores; torch {torch.__version__}; {args.clips} clips each of "
          f"H.264 and VP9 at {height}x{width}, {args.frames} frames at 24 fps, decoded at 8 fps into 25 frames")
    print("| decoder | clips | threads | frames/s (decoded for training) |")
    print("|---|---|---|---|")

    def decode_all(chosen, backend, threads):
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda r: decode_clip(r, spec, device=args.device, backend=backend), chosen))

    rows = [("pyav", h264, 1), ("pyav", h264, args.threads)]
    if dali_available():
        rows.append(("dali-cpu", vp9, 1))
        rows.append(("pyav", vp9, 1))
        if args.device == "cuda":
            rows.append(("dali-gpu", h264, 1))
    for backend, chosen, threads in rows:
        seconds = timed(lambda: decode_all(chosen, backend, threads), args.repeats)
        print(f"| {backend} | {chosen[0]['codec']} | {threads} | {len(chosen) * spec.frames / seconds:,.1f} |")


if __name__ == "__main__":
    main()
