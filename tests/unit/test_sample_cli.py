"""`cogvx sample`: a playable MP4 (PyAV reads back the frame count and size) and a GIF from a tiny model and VAE,
final latents that are the sampler's for the same seed, the T5 prompt path, and bad input refused with one line,
exit 2 and nothing written."""
from __future__ import annotations

import pytest
import torch

from families import make_diffusers_model

from cogvx_mega.cli import EXIT_USER_ERROR, main

FRAMES, HEIGHT, WIDTH = 9, 32, 48  # 3 latent frames (an odd count decodes to 1 + 4k frames)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from diffusers import AutoencoderKLCogVideoX
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sample")
    make_diffusers_model("rope-5b", std=0.1).save_pretrained(root / "transformer")
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                                 latent_channels=4)
    vae.save_pretrained(root / "vae")
    AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                           latent_channels=8).save_pretrained(root / "vae8")
    embeds = torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(0))
    save_file({"prompt_embeds": embeds}, str(root / "prompt.safetensors"))
    return root


def sample_args(root, out, *extra):
    return ["sample", "--ckpt", str(root / "transformer"), "--vae", str(root / "vae"), "--prompt-embeds",
            str(root / "prompt.safetensors"), "--steps", "3", "--frames", str(FRAMES), "--size", f"{HEIGHT}x{WIDTH}",
            "--output", str(out), "--device", "cpu", *extra]


def test_sample_writes_a_playable_mp4_a_gif_and_the_sampler_latents(assets, tmp_path):
    import av
    from safetensors.torch import load_file

    import cogvx_mega
    from cogvx_mega.diffusion.sampler import SamplingSettings, sample_latents
    from cogvx_mega.diffusion.schedule import schedule_from_config
    from cogvx_mega.tools.sample import diffusion_config_for

    out = tmp_path / "clip.mp4"
    assert main(sample_args(assets, out, "--gif", "--save-latents", str(tmp_path / "final.safetensors"),
                            "--scheduler", "ddim", "--guidance", "4", "--seed", "3")) == 0
    for path, frames in ((out, FRAMES), (tmp_path / "clip.gif", FRAMES)):
        with av.open(str(path)) as container:
            decoded = list(container.decode(video=0))
        assert len(decoded) == frames and (decoded[0].height, decoded[0].width) == (HEIGHT, WIDTH), path
    model = cogvx_mega.from_pretrained(str(assets / "transformer"))
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(1, (FRAMES - 1) // 4 + 1, 4, HEIGHT // 8, WIDTH // 8, generator=generator)
    prompt = load_file(str(assets / "prompt.safetensors"))["prompt_embeds"]
    expected = sample_latents(model, start, prompt, None, SamplingSettings(3, 4.0, False, "ddim"),
                              schedule_from_config(diffusion_config_for(str(assets / "transformer"))))
    assert torch.allclose(load_file(str(tmp_path / "final.safetensors"))["latents"], expected, atol=1e-5)


def test_sample_from_a_prompt_through_t5(assets, tmp_path):
    from text_encoder import make_tiny_t5

    make_tiny_t5(tmp_path / "t5", d_model=12)
    out = tmp_path / "prompt.mp4"
    assert main(["sample", "--ckpt", str(assets / "transformer"), "--vae", str(assets / "vae"), "--prompt",
                 "a red square moving left", "--text-encoder", str(tmp_path / "t5"), "--steps", "2", "--frames",
                 str(FRAMES), "--size", f"{HEIGHT}x{WIDTH}", "--output", str(out), "--device", "cpu"]) == 0
    assert out.is_file()


@pytest.mark.parametrize("change, needle", [
    (["--vae", "VAE8"], "another model family"),
    (["--frames", "6"], "1+4k"),
    (["--prompt", "a red square"], "--text-encoder"),
    (["--size", "30x48"], "multiples of 16"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(assets, tmp_path, capsys, change, needle):
    out = tmp_path / "clip.mp4"
    args = sample_args(assets, out)
    change = [str(assets / "vae8") if token == "VAE8" else token for token in change]
    flag = change[0]
    if flag in args:
        args[args.index(flag) + 1] = change[1]
    else:
        args += change
    assert main(args) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"keep")
    assert main(sample_args(assets, out)) == EXIT_USER_ERROR
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep"


def test_an_output_folder_is_created_and_an_unwritable_one_refused_before_the_work(assets, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "clip.mp4"
    assert main(sample_args(assets, out)) == 0 and out.is_file()  # the missing folders were created
    capsys.readouterr()
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"keep")
    for bad, needle in [(blocker / "clip.mp4", "which is a file"), (tmp_path / "new", "is a folder")]:
        assert main(sample_args(assets, bad, "--overwrite")) == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "--output" in err[0], err
    assert blocker.read_bytes() == b"keep"
