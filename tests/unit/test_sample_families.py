"""`cogvx sample` for the families the text-to-video export test does not cover, against diffusers' own
pipelines run from the same seed (no initial latents given, so the order in which both draw from the
generator is checked too): the 5B-I2V and 1.5-I2V models through `CogVideoXImageToVideoPipeline` (image
resized and encoded, posterior draw, latent scale, inverted for the 1.5-I2V VAE, ofs), and the 1.5 text-to-video
model through `CogVideoXPipeline` (latent frames rounded up to whole temporal patches). The final latents agree
within 1e-4 (fp32, CPU); the decode drops the padding frame as the pipelines do (1e-4). Bad image input is one
line, exit 2."""
from __future__ import annotations

import pytest
import torch

from families import FAMILIES, make_diffusers_model

from cogvx_mega.cli import EXIT_USER_ERROR, main

FRAMES, STEPS, GUIDANCE, SEED = 9, 3, 4.0, 5
# the 5B-I2V model has learned positions: it runs only at its sample resolution (8 x 12 latents)
SIZES = {"i2v-5b": (64, 96), "v15-i2v": (32, 48), "v15-5b": (32, 48)}


def make_vae(invert_scale_latents: bool = False):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(1)
    return AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                                  latent_channels=4, invert_scale_latents=invert_scale_latents,
                                  scaling_factor=0.7).eval()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers import CogVideoXDPMScheduler
    from PIL import Image
    from safetensors.torch import save_file

    from cogvx_mega.config.training import DiffusionConfig
    from cogvx_mega.tools.export import scheduler_config

    root = tmp_path_factory.mktemp("families")
    generator = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(1, 5, 12, generator=generator)}, str(root / "prompt.safetensors"))
    save_file({"negative_prompt_embeds": torch.randn(1, 5, 12, generator=generator)},
              str(root / "negative.safetensors"))
    pixels = (torch.rand(50, 70, 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(root / "first.png")  # not the sample size: both resize it
    (root / "broken.png").write_bytes(b"not an image")
    scheduler = CogVideoXDPMScheduler.from_config(scheduler_config(DiffusionConfig()))
    for family in SIZES:
        make_diffusers_model(family, std=0.1).save_pretrained(root / family / "transformer")
        make_vae(invert_scale_latents=family == "v15-i2v").save_pretrained(root / family / "vae")
        scheduler.save_pretrained(root / family / "scheduler")
    return root


def sample_args(root, family, out, *extra):
    height, width = SIZES[family]
    return ["sample", "--ckpt", str(root / family / "transformer"), "--vae", str(root / family / "vae"),
            "--prompt-embeds", str(root / "prompt.safetensors"), "--negative-prompt-embeds",
            str(root / "negative.safetensors"), "--steps", str(STEPS), "--scheduler", "dpm", "--guidance",
            str(GUIDANCE), "--seed", str(SEED), "--frames", str(FRAMES), "--size", f"{height}x{width}",
            "--output", str(out), "--device", "cpu", *extra]


def diffusers_pipeline(root, family):
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXPipeline, CogVideoXTransformer3DModel)

    parts = dict(tokenizer=None, text_encoder=None,
                 vae=AutoencoderKLCogVideoX.from_pretrained(str(root / family / "vae")).eval(),
                 transformer=CogVideoXTransformer3DModel.from_pretrained(str(root / family / "transformer")).eval(),
                 scheduler=CogVideoXDPMScheduler.from_pretrained(str(root / family / "scheduler")))
    image_to_video = FAMILIES[family]["in_channels"] != FAMILIES[family]["out_channels"]
    return (CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline)(**parts), image_to_video


@pytest.mark.parametrize("family", sorted(SIZES))
def test_sample_matches_the_diffusers_pipeline_from_the_same_seed(assets, tmp_path, family):
    from PIL import Image
    from safetensors.torch import load_file

    root = assets
    pipeline, image_to_video = diffusers_pipeline(root, family)
    height, width = SIZES[family]
    tensors = {name: load_file(str(root / f"{name}.safetensors")) for name in ("prompt", "negative")}
    inputs = dict(prompt_embeds=tensors["prompt"]["prompt_embeds"],
                  negative_prompt_embeds=tensors["negative"]["negative_prompt_embeds"], num_frames=FRAMES,
                  height=height, width=width, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  output_type="latent", generator=torch.Generator().manual_seed(SEED))
    if image_to_video:
        inputs["image"] = Image.open(root / "first.png").convert("RGB")
    with torch.no_grad():
        expected = pipeline(**inputs).frames
    extra = ["--image", str(root / "first.png")] if image_to_video else []
    assert main(sample_args(root, family, tmp_path / "clip.mp4", "--save-latents", str(tmp_path / "final.safetensors"),
                            *extra)) == 0
    actual = load_file(str(tmp_path / "final.safetensors"))["latents"]
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4

    if FAMILIES[family].get("patch_size_t"):  # 3 latent frames rounded up to 4; the first is not decoded
        from cogvx_mega.tools.load import load_vae
        from cogvx_mega.training.sampling import decode_video, latent_grid
        from cogvx_mega.tools.load import load_transformer

        grid = latent_grid(load_transformer(str(root / family / "transformer")).model_config, FRAMES, height, width)
        assert (grid.frames, grid.dropped_frames) == (4, 1)
        with torch.no_grad():
            reference = pipeline.decode_latents(expected[:, grid.dropped_frames:])
        video = decode_video(load_vae(str(root / family / "vae")), actual, grid)
        assert video.shape == reference.shape and video.shape[2] == FRAMES
        assert (video - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family, change, needle", [
    ("i2v-5b", [], "--image"),
    ("v15-5b", ["--image", "IMAGE"], "text-to-video model"),
    ("v15-i2v", ["--image", "BROKEN"], "is not an image"),
    ("v15-i2v", ["--image", "MISSING"], "no such file"),
])
def test_bad_image_input_is_one_line_exit_2_and_nothing_written(assets, tmp_path, capsys, family, change, needle):
    root = assets
    paths = {"IMAGE": str(root / "first.png"), "BROKEN": str(root / "broken.png"), "MISSING": str(root / "none.png")}
    out = tmp_path / "clip.mp4"
    assert main(sample_args(root, family, out, *[paths.get(v, v) for v in change])) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and needle in error[0]
    assert list(tmp_path.iterdir()) == []
