"""Throughput of the data path, in three parts:

1. decode: frames/s decoded for training (sampled at 8 fps, resized and cropped) by PyAV (1 and N
   threads), DALI's CPU decoder and, on a GPU, DALI with NVDEC;
2. encode: clips/s of `cogvx data encode`'s encoder (decode -> VAE posterior moments, captions -> T5) with
   decoding in the calling thread and in N background threads;
3. reader: samples/s the latent-cache reader (tensorstore) delivers at `--reader-size`, beside the samples/s
   one training step of `--train-preset` consumes on this device.

    python benchmarks/data_throughput.py                       # CPU: PyAV (1 and N threads), DALI-CPU
    python benchmarks/data_throughput.py --device cuda         # adds DALI-GPU (NVDEC) and the GPU step
    python benchmarks/data_throughput.py --device cuda --encode-size 49x480x720 --train-preset cogvideox-2b

The encode VAE is the CogVideoX VAE architecture (diffusers' default AutoencoderKLCogVideoX config) with
random weights unless `--vae` names a folder, the T5 a tiny random one unless `--text-encoder` does: the
speed of a convolution does not depend on its weights, but T5-XXL is much slower than the tiny one.

Clips are generated moving shapes encoded with real codecs (H.264 in MP4 for PyAV and NVDEC, VP9 in WebM
for DALI's CPU decoder, which refuses H.264), `--clips` of each at `--size`, `--frames` frames at 24 fps,
decoded at 8 fps into 1 + 4k frames as training does. Each figure is the median of `--repeats` passes.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def make_clips(folder: Path, count: int, frames: int, height: int, width: int,
               codecs=(("mp4", "libx264"), ("webm", "libvpx-vp9"))) -> list[dict]:
    from cogvx_mega.data.manifest import find_media, scan
    from cogvx_mega.data.synthetic import random_clip_spec, render_clip_uint8, write_video_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        spec = random_clip_spec(generator)
        pixels = render_clip_uint8(spec, frames, height, width)
        for suffix, codec in codecs:
            name = f"{codec}_{index}.{suffix}"
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


def encode_rows(args, work: Path, device: str) -> None:
    from cogvx_mega.data.buckets import Bucket
    from cogvx_mega.data.encoder import ClipEncoder
    from cogvx_mega.data.text import T5TextEncoder
    from cogvx_mega.data.tiny_models import make_tiny_t5
    from cogvx_mega.tools.load import load_vae

    bucket = Bucket.parse(args.encode_size)
    if args.vae is None:
        from diffusers import AutoencoderKLCogVideoX

        args.vae = str(work / "vae")
        AutoencoderKLCogVideoX().save_pretrained(args.vae)  # the real architecture, random weights
    if args.text_encoder is None:
        args.text_encoder = str(make_tiny_t5(work / "t5", d_model=64))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vae = load_vae(args.vae, device=device, dtype=dtype)
    text = T5TextEncoder(args.text_encoder, max_length=226, device=device)
    source_frames = int((bucket.frames - 1) * 24 / 8) + 1
    records = make_clips(work / "encode", args.encode_clips, source_frames, bucket.height, bucket.width,
                         codecs=(("mp4", "libx264"),))
    print(f"\nencode: {len(records)} H.264 clips into bucket {bucket.name}, VAE {vae.config.block_out_channels} "
          f"in {dtype}, T5 width {text.width}")
    print("| decode threads | clips/s | s/clip |")
    print("|---|---|---|")
    for workers in (0, args.threads):
        with ClipEncoder(vae, text, fps=8, device=device, workers=workers) as encoder:
            def run():
                encoder.encode(records, bucket)
                if device == "cuda":
                    torch.cuda.synchronize()
            run()  # warm-up (kernels, decoder pipelines)
            seconds = timed(run, args.repeats)
        print(f"| {workers} | {len(records) / seconds:.3f} | {seconds / len(records):.2f} |")


def reader_rows(args, work: Path, device: str) -> None:
    from cogvx_mega.data.buckets import Bucket
    from cogvx_mega.data.cache import committed, create_store, plan_cache, write_shard
    from cogvx_mega.data.cache_reader import CacheDataset
    from cogvx_mega.data.encoder import EncodedClips

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import time_train_step

    bucket = Bucket.parse(args.reader_size)
    channels, text_length, text_width = 16, 226, 4096  # CogVideoX latents and T5-XXL embeddings
    latent = (channels, 1 + (bucket.frames - 1) // 4, bucket.height // 8, bucket.width // 8)
    records = [{"path": f"clip_{i}.mp4", "caption": f"clip {i}", "kind": "video", "fps": 8.0,
                "frames": bucket.frames, "height": bucket.height, "width": bucket.width}
               for i in range(args.reader_clips)]
    plan = plan_cache(records, [bucket.name], 8.0, shard_clips=8)
    store = work / "reader.zarr"
    create_store(store, plan, channels, text_length, text_width, {"scaling_factor": 1.15258426})
    rng = np.random.default_rng(0)

    class RandomMoments:  # stands in for the VAE: the reader's cost depends on the array sizes only
        def encode(self, chosen, _bucket, _decoded=None):
            moments = [(rng.standard_normal(latent, dtype=np.float32),
                        rng.standard_normal(latent, dtype=np.float32) - 8) for _ in chosen]
            return EncodedClips(moments, rng.standard_normal((len(chosen), text_length, text_width),
                                                             dtype=np.float32), [None] * len(chosen),
                                [rng.integers(0, 256, (3, bucket.height, bucket.width), dtype=np.uint8)
                                 for _ in chosen])

    for shard in plan.shards:
        write_shard(store, plan, shard, RandomMoments())
    assert len(committed(store)) == len(plan.shards)
    data = CacheDataset(str(store))
    batch = args.reader_batch
    steps = args.reader_clips // batch * 2  # two epochs
    data.step_batch(0, range(batch), batch, seed=0)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        data.step_batch(step, range(batch), batch, seed=0)
    reader_per_s = steps * batch / (time.perf_counter() - started)
    size_mb = (2 * np.prod(latent) + text_length * text_width) * 2 / 1e6
    print(f"\nreader: {args.reader_clips} clips of {bucket.name} (latent {list(latent)} + text "
          f"[{text_length}, {text_width}], {size_mb:.1f} MB each, stored in float16), batches of {batch}")
    print(f"| reader | {reader_per_s:.1f} samples/s | {reader_per_s * size_mb:.0f} MB/s |")
    config, trainer, times = time_train_step(args.train_preset, device, [], warmup=2, steps=3)
    step_s = statistics.median(times)
    frames, height, width = config.data.latent_shape(config.model)
    print(f"| training step ({config.preset}, latent grid {frames}x{height}x{width}, micro-batch "
          f"{config.training.micro_batch_size}) | {config.training.micro_batch_size / step_s:.2f} samples/s | "
          f"{step_s * 1e3:.0f} ms/step |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=72, help="source frames at 24 fps (72: 3 s, 25 frames at 8 fps)")
    parser.add_argument("--size", default="480x720")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="decode,encode,reader", help="which parts to run (comma-separated)")
    parser.add_argument("--encode-size", default="9x240x360", help="encode bucket FRAMESxHEIGHTxWIDTH")
    parser.add_argument("--encode-clips", type=int, default=4)
    parser.add_argument("--vae", help="a VAE folder for the encode part (default: random CogVideoX VAE)")
    parser.add_argument("--text-encoder", help="a T5 folder for the encode part (default: tiny random T5)")
    parser.add_argument("--reader-size", default="49x480x720", help="cached clip size FRAMESxHEIGHTxWIDTH")
    parser.add_argument("--reader-clips", type=int, default=16)
    parser.add_argument("--reader-batch", type=int, default=2, help="samples per reader call (one rank's step)")
    parser.add_argument("--train-preset", default="tiny", help="the model whose step the reader is compared to")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    work = Path(tempfile.mkdtemp(prefix="cogvx-data-bench-"))
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    print(f"device: {name}, {os.cpu_count()} cores; torch {torch.__version__}")
    if "decode" in parts:
        decode_rows(args, work)
    if "encode" in parts:
        encode_rows(args, work, args.device)
    if "reader" in parts:
        reader_rows(args, work, args.device)


def decode_rows(args, work: Path) -> None:
    from cogvx_mega.data.decode import DecodeSpec, dali_available, decode_clip

    height, width = map(int, args.size.split("x"))
    records = make_clips(work / "decode", args.clips, args.frames, height, width)
    h264 = [r for r in records if r["codec"] == "h264"]
    vp9 = [r for r in records if r["codec"] == "vp9"]
    spec = DecodeSpec(frames=25, height=height, width=width, fps=8)
    print(f"\ndecode: {args.clips} clips each of H.264 and VP9 at {height}x{width}, {args.frames} frames at 24 fps, "
          f"decoded at 8 fps into 25 frames")
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
