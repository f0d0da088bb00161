"""What verification adds to a resume: the time to check a checkpoint's recorded sizes and CRC32Cs against the
time to load it (model and optimizer) into a trainer, on one process.

    .venv/bin/python benchmarks/checkpoint_verify.py [--layers 24] [--hidden-heads 16] [--cold]

The model is the `tiny` preset widened (heads x 64 = hidden) and deepened until the checkpoint is as large as
the machine allows (fp32 weights and Adam's two moments: 12 B per parameter on disk). `--cold` drops the page
cache before each measurement (root only), so both read from the disk instead of memory.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden-heads", type=int, default=16, help="attention heads of 64 channels")
    parser.add_argument("--cold", action="store_true")
    args = parser.parse_args()

    import torch

    from cogvx_mega.checkpoint.verify import verify_checkpoint
    from cogvx_mega.config import load_config
    from cogvx_mega.data.latent_dataset import synthetic_dataset_for
    from cogvx_mega.model.transformer import build_model_chunks
    from cogvx_mega.parallel.state import initialize_parallel
    from cogvx_mega.training.trainer import Trainer

    run_dir = Path(tempfile.mkdtemp(prefix="cogvx-verify-bench-"))
    config = load_config("tiny", overrides=[
        f"model.num_layers={args.layers}", f"model.num_attention_heads={args.hidden_heads}",
        "model.attention_head_dim=64", "data.num_frames=1", "data.height=64", "data.width=64",
        "data.num_synthetic_clips=2", "training.micro_batch_size=1", f"training.run_dir='{run_dir}'"])
    dims = initialize_parallel(config.parallel, device="cpu", seed=0)
    chunks = build_model_chunks(config.model, config.parallel, device="cpu")
    parameters = sum(p.numel() for p in chunks[0].parameters())
    trainer = Trainer(config, dims, chunks, synthetic_dataset_for(config))
    trainer.train_step(trainer.dataset.step_batch(0, trainer.slots, trainer.global_batch, 0))
    started = time.perf_counter()
    folder = trainer.save()
    save_seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in folder.iterdir())
    cold = args.cold and drop_caches()
    started = time.perf_counter()
    verdict = verify_checkpoint(folder)
    verify_seconds = time.perf_counter() - started
    assert verdict.ok, verdict.problems
    if args.cold:
        drop_caches()
    started = time.perf_counter()
    trainer.load(str(folder))
    load_seconds = time.perf_counter() - started
    print(f"{parameters / 1e6:.0f}M parameters, checkpoint {size / 1e9:.2f} GB ({verdict.files} files), "
          f"{'cold' if cold else 'warm'} page cache, {torch.get_num_threads()} threads")
    print(f"save {save_seconds:.2f} s (checksums included); verify {verify_seconds:.2f} s "
          f"({size / 1e9 / verify_seconds:.2f} GB/s); load {load_seconds:.2f} s; verification adds "
          f"{verify_seconds / load_seconds:.0%} to the load")
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
