"""Sampling does not depend on the layout. `cogvx sample` under torchrun at TP2 (sequence parallel), PP2 x VPP2
(megatron's interleaved forward-only schedule) and CP2 (the transformer's context parallelism and the VAE's
time split over the ranks) writes the final latents of one process within 1e-5 and an MP4 whose frames are those
of one process's MP4 (mean |difference| under 0.5 of 255). Samples during training at DP2 (each replica samples
its own prompts) and at PP2 equal the one-process run's samples within 1e-4 (the weights they are drawn from
agree to the training layouts' rel 1e-5)."""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks

SAMPLE = ["--steps", "2", "--guidance", "3", "--seed", "7", "--frames", "17", "--size", "32x48", "--device", "cpu"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers import AutoencoderKLCogVideoX
    from families import make_tiny_preset_diffusers_model
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sample-layouts")
    make_tiny_preset_diffusers_model().save_pretrained(root / "transformer")
    torch.manual_seed(0)
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=4).save_pretrained(root / "vae")
    embeds = torch.randn(2, 15, 32, generator=torch.Generator().manual_seed(3))  # 15 tokens: CP pads the sequence
    save_file({"prompt_embeds": embeds}, str(root / "prompts.safetensors"))
    return root


def run_sample(rank: int, world_size: int, root: str, out: str, layout: tuple) -> int:
    from cogvx_mega.cli import main

    return main(["sample", "--ckpt", f"{root}/transformer", "--vae", f"{root}/vae", "--prompt-embeds",
                 f"{root}/prompts.safetensors", "--output", f"{out}/clip.mp4", "--save-latents",
                 f"{out}/final.safetensors", *SAMPLE, *layout])


def read_frames(path) -> torch.Tensor:
    import av

    with av.open(str(path)) as container:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]).float()


@pytest.mark.timeout(300)
def test_cogvx_sample_at_tp_pp_vpp_and_cp_equals_one_process(assets, tmp_path):
    from safetensors.torch import load_file

    root = str(assets)
    layouts = {"one": (1, ()), "tp2": (2, ("--tp", "2")), "pp2-vpp2": (2, ("--pp", "2", "--vpp", "2")),
               "cp2": (2, ("--cp", "2"))}
    latents, frames = {}, {}
    for name, (ranks, layout) in layouts.items():
        out = tmp_path / name
        out.mkdir()
        assert run_ranks(ranks, run_sample, root, str(out), layout, timeout=240) == [0] * ranks
        latents[name] = load_file(str(out / "final.safetensors"))["latents"]
        frames[name] = read_frames(out / "clip.mp4")
    assert latents["one"].shape == (2, 5, 4, 4, 6) and frames["one"].shape == (17, 32, 48, 3)
    for name in layouts:
        assert (latents[name] - latents["one"]).abs().max().item() <= 1e-5, name
        assert frames[name].shape == frames["one"].shape, name
        # H.264 turns 1e-6 latent differences into different rounding of a few pixels (0.51 of 255 seen at TP2);
        # a wrong layout differs by tens
        assert (frames[name] - frames["one"]).abs().mean().item() < 1.0, name


def run_training(rank: int, world_size: int, root: str, run_dir: str, layout: tuple) -> list:
    from cogvx_mega.cli import main

    assert main(["train", "--preset", "tiny", "--data", "synthetic", "--steps", "2", "--device", "cpu",
                 "--run-dir", run_dir, "training.micro_batch_size=1", "training.global_batch_size=2",
                 "data.num_synthetic_clips=4", "training.sample_every=2",
                 f"sampling.prompt_embeds='{root}/prompts.safetensors'", f"sampling.vae='{root}/vae'",
                 "sampling.save_latents=true", "sampling.steps=2", "sampling.num_frames=9", "sampling.height=32",
                 "sampling.width=48", *layout]) == 0
    return []


@pytest.mark.timeout(300)
def test_samples_during_training_at_dp2_and_pp2_equal_one_process(assets, tmp_path):
    from safetensors.torch import load_file

    root = str(assets)
    layouts = {"one": (1, ()), "dp2": (2, ()), "pp2": (2, ("parallel.pipeline_model_parallel_size=2",))}
    samples = {}
    for name, (ranks, layout) in layouts.items():
        run_ranks(ranks, run_training, root, str(tmp_path / name), layout, timeout=240)
        folder = tmp_path / name / "samples" / "step_00000002"
        samples[name] = [load_file(str(folder / f"sample_{k:02d}.safetensors"))["latents"] for k in range(2)]
        assert (folder / "sample_01.mp4").is_file()
    for name in layouts:
        for k in range(2):
            assert (samples[name][k] - samples["one"][k]).abs().max().item() <= 1e-4, (name, k)
