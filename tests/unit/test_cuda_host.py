"""The CPU entry points on a machine where CUDA is present: each runs in a fresh interpreter in which
`torch.cuda.is_available()` answers True (and one device is reported) although this torch build has no
CUDA, so any code that reached for the GPU would fail. `cogvx train --device cpu`, `cogvx convert`,
`from_pretrained` and `cogvx vae` must all work there."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

FAKE_CUDA = textwrap.dedent("""
    import sys
    import torch
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
""")


def run_with_fake_cuda(code: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "fake_cuda_script.py"
    script.write_text(FAKE_CUDA + textwrap.dedent(code))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.timeout(600)
def test_cpu_entry_points_work_where_cuda_is_present(tmp_path):
    from families import make_tiny_preset_diffusers_model

    if torch.cuda.is_available():
        pytest.skip("a real GPU is present: the fake presence check is not needed")
    released = tmp_path / "released"
    make_tiny_preset_diffusers_model().save_pretrained(released)
    run = tmp_path / "run"
    run_with_fake_cuda(f"""
        from cogvx_mega.cli import main
        status = main(["train", "--preset", "tiny", "--data", "synthetic", "--device", "cpu", "--steps", "1",
                       "--run-dir", {str(run)!r}, "data.num_synthetic_clips=2", "training.micro_batch_size=2",
                       "--init-from", {str(released)!r}])
        assert status == 0, status
    """, tmp_path)
    checkpoint = run / "checkpoints" / "step_00000001"
    assert checkpoint.is_dir()
    from diffusers import AutoencoderKLCogVideoX

    from cogvx_mega.vae import io

    vae_dir = tmp_path / "vae"
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=4).save_pretrained(vae_dir)
    io.write_video(str(tmp_path / "clip.mp4"), torch.rand(1, 3, 5, 32, 32) * 2 - 1, fps=8.0)
    # the tools in one interpreter (none of them turns the process CPU-only, so CUDA stays "present")
    run_with_fake_cuda(f"""
        import cogvx_mega
        from cogvx_mega.checkpoint.reader import read_transformer_checkpoint
        from cogvx_mega.cli import main
        assert main(["convert", "project-to-diffusers", {str(checkpoint)!r}, {str(tmp_path / "out")!r}]) == 0
        assert main(["convert", "diffusers-to-project", {str(released)!r}, {str(tmp_path / "single")!r}]) == 0
        paths = ({str(checkpoint)!r}, {str(released)!r}, {str(tmp_path / "single")!r})
        for path in paths:
            read_transformer_checkpoint(path)
        assert not torch.distributed.is_initialized()  # converting and reading need no process group
        for path in paths:
            model = cogvx_mega.from_pretrained(path)
            out = model(torch.randn(1, 3, 4, 8, 8), torch.randn(1, 16, 32), torch.tensor([10]))
            assert out.shape == (1, 3, 4, 8, 8) and out.device.type == "cpu"
        assert torch.distributed.get_world_size() == 1  # the model's private one-process world
        assert main(["vae", "encode", {str(tmp_path / "clip.mp4")!r}, {str(tmp_path / "clip.safetensors")!r},
                     "--vae", {str(vae_dir)!r}, "--device", "cpu"]) == 0
    """, tmp_path)
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "clip.safetensors").is_file()
