"""Samples during training (`training.sample_every`): a run writes MP4s (and with sampling.save_latents the final
latents) under <run_dir>/samples/step_N/ every N steps and names them in that step's metrics line; sample k
equals `cogvx sample --seed S` of the step's checkpoint for prompt k (1e-5); sampling does not change training
(the losses equal a run without samples, exactly); a misconfigured sampler is one line, exit 2, nothing
written."""
from __future__ import annotations

import json

import pytest
import torch

from cogvx_mega.cli import EXIT_USER_ERROR, main

SAMPLING = ["sampling.steps=2", "sampling.guidance_scale=3.0", "sampling.seed=7", "sampling.num_frames=9",
            "sampling.height=32", "sampling.width=48"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers import AutoencoderKLCogVideoX
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("training-samples")
    torch.manual_seed(0)
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=4).save_pretrained(root / "vae")
    embeds = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))  # the tiny preset's text shape
    save_file({"prompt_embeds": embeds}, str(root / "prompts.safetensors"))
    save_file({"prompt_embeds": embeds[:1]}, str(root / "prompt_1.safetensors"))
    return root


def train_args(run_dir, *extra):
    return ["train", "--preset", "tiny", "--data", "synthetic", "--steps", "4", "--device", "cpu", "--run-dir",
            str(run_dir), "training.micro_batch_size=2", "data.num_synthetic_clips=8", *extra]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_samples_are_written_named_in_the_metrics_and_equal_cogvx_sample(assets, tmp_path):
    import av
    from safetensors.torch import load_file

    root = assets
    run = tmp_path / "run"
    assert main(train_args(run, "training.sample_every=2", f"sampling.prompt_embeds='{root / 'prompts.safetensors'}'",
                           f"sampling.vae='{root / 'vae'}'", "sampling.save_latents=true", *SAMPLING)) == 0
    metrics = read_metrics(run)
    assert [("samples" in m) for m in metrics] == [False, True, False, True]
    for record in metrics:
        if "samples" not in record:
            continue
        folder = f"samples/step_{record['step']:08d}"
        assert record["samples"] == [f"{folder}/sample_00.mp4", f"{folder}/sample_00.safetensors",
                                     f"{folder}/sample_01.mp4", f"{folder}/sample_01.safetensors"]
        for name in record["samples"]:
            assert (run / name).is_file(), name
        with av.open(str(run / record["samples"][0])) as container:
            frames = [frame for frame in container.decode(video=0)]
        assert len(frames) == 9 and (frames[0].height, frames[0].width) == (32, 48)
    # the samples of step 2 and step 4 differ (the weights moved); sample 0 and 1 differ (the prompts do)
    latents = {name: load_file(str(run / name))["latents"] for name in metrics[3]["samples"][1::2]}
    step2 = load_file(str(run / metrics[1]["samples"][1]))["latents"]
    first, second = latents.values()
    assert not torch.equal(first, second) and not torch.equal(first, step2)

    # sample 0 of step 4 is `cogvx sample` of the step-4 checkpoint for prompt 0 with the same seed
    checkpoint = run / "checkpoints" / "step_00000004"
    assert main(["sample", "--ckpt", str(checkpoint), "--vae", str(root / "vae"), "--prompt-embeds",
                 str(root / "prompt_1.safetensors"), "--steps", "2", "--guidance", "3", "--seed", "7", "--frames", "9",
                 "--size", "32x48", "--output", str(tmp_path / "clip.mp4"), "--save-latents",
                 str(tmp_path / "final.safetensors"), "--device", "cpu"]) == 0
    expected = load_file(str(tmp_path / "final.safetensors"))["latents"]
    assert (first - expected).abs().max().item() <= 1e-5

    # and sampling changed nothing in training
    plain = tmp_path / "plain"
    assert main(train_args(plain)) == 0
    assert [(m["loss"], m["grad_norm"]) for m in read_metrics(plain)] == [(m["loss"], m["grad_norm"]) for m in metrics]


@pytest.mark.parametrize("change, needle", [
    (["training.sample_every=2"], "sampling.prompts"),
    (["training.sample_every=2", "sampling.prompt_embeds='PROMPTS'"], "sampling.vae"),
    (["training.sample_every=2", "sampling.prompts=['a cat']", "sampling.vae='VAE'"], "text_encoder"),
    (["training.sample_every=2", "sampling.prompt_embeds='MISSING'", "sampling.vae='VAE'"], "no such file"),
    (["sampling.num_frames=8"], "1+4k"),
])
def test_bad_sampling_config_is_one_line_exit_2_and_nothing_written(assets, tmp_path, capsys, change, needle):
    root = assets
    paths = {"PROMPTS": str(root / "prompts.safetensors"), "VAE": str(root / "vae"),
             "MISSING": str(root / "none.safetensors")}
    for key, value in paths.items():
        change = [item.replace(key, value) for item in change]
    run = tmp_path / "run"
    assert main(train_args(run, *change)) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and needle in error[0], error
    assert not run.exists()
