"""`cogvx export diffusers`: the folder loads with `CogVideoXPipeline.from_pretrained` and
`CogVideoXTransformer3DModel.from_pretrained(subfolder="transformer")` (weights exact), its scheduler is the
training schedule, the pipeline's latents equal `cogvx sample --save-latents` for the same inputs within 1e-4,
weights split into shards with diffusers' index when large; an existing folder or another family's VAE is
refused with one line, exit 2 and nothing written."""
from __future__ import annotations

import pytest
import torch

from families import make_diffusers_model

from cogvx_mega.cli import EXIT_USER_ERROR, main

FRAMES, HEIGHT, WIDTH = 9, 32, 48


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers import AutoencoderKLCogVideoX
    from safetensors.torch import save_file
    from text_encoder import make_tiny_t5

    root = tmp_path_factory.mktemp("export")
    reference = make_diffusers_model("rope-5b", std=0.1)
    reference.save_pretrained(root / "transformer")
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=4).save_pretrained(root / "vae")
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=8).save_pretrained(root / "vae8")
    make_tiny_t5(root / "t5", d_model=12)
    generator = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(1, 5, 12, generator=generator)}, str(root / "prompt.safetensors"))
    save_file({"negative_prompt_embeds": torch.randn(1, 5, 12, generator=generator)}, str(root / "negative.safetensors"))
    save_file({"latents": torch.randn(1, 3, 4, HEIGHT // 8, WIDTH // 8, generator=generator)},
              str(root / "start.safetensors"))
    assert main(["export", "diffusers", "--ckpt", str(root / "transformer"), "--vae", str(root / "vae"),
                 "--text-encoder", str(root / "t5"), "--out", str(root / "release")]) == 0
    return root, reference


def test_the_export_loads_in_diffusers_and_samples_like_cogvx_sample(assets, tmp_path):
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
    from safetensors.torch import load_file

    root, reference = assets
    transformer = CogVideoXTransformer3DModel.from_pretrained(str(root / "release"), subfolder="transformer")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(transformer.state_dict()[name], tensor), name
    pipeline = CogVideoXPipeline.from_pretrained(str(root / "release"))
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert pipeline.scheduler.config.timestep_spacing == "trailing"
    tensors = {name: load_file(str(root / f"{name}.safetensors")) for name in ("prompt", "negative", "start")}
    with torch.no_grad():
        expected = pipeline(prompt_embeds=tensors["prompt"]["prompt_embeds"],
                            negative_prompt_embeds=tensors["negative"]["negative_prompt_embeds"],
                            latents=tensors["start"]["latents"], num_frames=FRAMES, height=HEIGHT, width=WIDTH,
                            num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                            generator=torch.Generator().manual_seed(5)).frames
    assert main(["sample", "--ckpt", str(root / "release" / "transformer"), "--vae", str(root / "release" / "vae"),
                 "--prompt-embeds", str(root / "prompt.safetensors"), "--negative-prompt-embeds",
                 str(root / "negative.safetensors"), "--latents", str(root / "start.safetensors"), "--steps", "3",
                 "--scheduler", "dpm", "--guidance", "4", "--seed", "5", "--frames", str(FRAMES), "--size",
                 f"{HEIGHT}x{WIDTH}", "--output", str(tmp_path / "clip.mp4"), "--save-latents",
                 str(tmp_path / "final.safetensors"), "--device", "cpu"]) == 0
    actual = load_file(str(tmp_path / "final.safetensors"))["latents"]
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


def test_large_weights_go_into_indexed_shards(tmp_path):
    import json

    from safetensors.torch import load_file

    from cogvx_mega.tools.export import write_sharded_safetensors

    state = {f"layer.{i}.weight": torch.full((64,), float(i)) for i in range(5)}
    names = write_sharded_safetensors(state, tmp_path, shard_bytes=600)  # 256 B per tensor: 2 per shard
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(names) == 3 and set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for key, name in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / name))[key], state[key])


@pytest.mark.parametrize("change, needle", [(["--out", "RELEASE"], "--overwrite"),
                                             (["--vae", "VAE8"], "another model family")])
def test_bad_export_input_is_one_line_exit_2_and_nothing_written(assets, tmp_path, capsys, change, needle):
    root, _ = assets
    out = tmp_path / "release"
    args = ["export", "diffusers", "--ckpt", str(root / "transformer"), "--vae", str(root / "vae"),
            "--text-encoder", str(root / "t5"), "--out", str(out)]
    value = {"RELEASE": str(root / "release"), "VAE8": str(root / "vae8")}[change[1]]
    args[args.index(change[0]) + 1] = value
    before = sorted(p.name for p in (root / "release").iterdir())
    assert main(args) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists() and sorted(p.name for p in (root / "release").iterdir()) == before


def test_the_release_example_runs(assets, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, _ = assets
    script = Path(__file__).resolve().parents[2] / "examples" / "release.sh"
    env = {**os.environ, "COGVX": f"{sys.executable} -m cogvx_mega.cli",
           "SAMPLE_FLAGS": f"--steps 2 --frames {FRAMES} --size {HEIGHT}x{WIDTH} --device cpu"}
    result = subprocess.run(["bash", str(script), str(root / "transformer"), str(root / "vae"), str(root / "t5"),
                             str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("sample.mp4", "sample.gif", "sample-latents.safetensors", "release/model_index.json"):
        assert (tmp_path / "out" / name).is_file(), name
