"""The 3D causal VAE against diffusers' AutoencoderKLCogVideoX (the oracle), its converters, the causal
boundary kernel against its torch reference, and bad input."""
from __future__ import annotations

import json

import pytest
import torch

from cogvx_mega.vae import CogVideoXVAE, VAEInputError, vae_config_from_diffusers

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference():
    """A tiny diffusers VAE with the real structure (4 blocks, time compressed in the first two)."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    model = AutoencoderKLCogVideoX(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                                   latent_channels=4).eval()
    with torch.no_grad():  # move norms and biases off their initial values
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def ours(reference):
    model = CogVideoXVAE(vae_config_from_diffusers(dict(reference.config))).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model


def clip(frames: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, frames, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(frames: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(1, 4, frames, 4, 4, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("frames", [1, 5, 9])  # one diffusers chunk: image, 1 + 4 and 1 + 8 frames
def test_encode_matches_diffusers(reference, ours, frames):
    video = clip(frames)
    with torch.no_grad():
        expected = reference.encode(video).latent_dist
        assert max_diff(ours.encode(video), expected.mean) <= TOLERANCE
        sample = ours.encode(video, sample=True, generator=torch.Generator().manual_seed(3))
        assert max_diff(sample, expected.sample(generator=torch.Generator().manual_seed(3))) <= TOLERANCE


@pytest.mark.parametrize("frames", [1, 2, 3])  # one diffusers chunk; 2 latents decode to 8 frames (even count)
def test_decode_matches_diffusers(reference, ours, frames):
    z = latents(frames)
    with torch.no_grad():
        assert max_diff(ours.decode(z), reference.decode(z).sample) <= TOLERANCE


def test_chunked_mode_matches_diffusers_frame_batches(reference, ours):
    """Past one chunk, diffusers walks time in frame batches with per-chunk GroupNorm; chunked mode is that walk."""
    video, z = clip(21), latents(5)
    with torch.no_grad():
        assert max_diff(ours.encode(video, chunk_frames=2), reference.encode(video).latent_dist.mean) <= TOLERANCE
        assert max_diff(ours.decode(z, chunk_frames=2), reference.decode(z).sample) <= TOLERANCE
        # a single chunk is the whole clip
        assert max_diff(ours.encode(video, chunk_frames=8), ours.encode(video)) <= TOLERANCE


def test_halo_path_equals_pad_and_concatenate(ours):
    video, z = clip(9), latents(3)
    with torch.no_grad():
        assert max_diff(ours.encode(video), ours.encode(video, conv_impl="naive")) <= TOLERANCE
        assert max_diff(ours.decode(z), ours.decode(z, conv_impl="naive")) <= TOLERANCE


def test_input_gradients_match_pad_and_concatenate(ours):
    video = clip(9).requires_grad_()
    weights = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    (ours.encode(video) * weights).sum().backward()
    halo_grad, video.grad = video.grad, None
    (ours.encode(video, conv_impl="naive") * weights).sum().backward()
    assert max_diff(halo_grad, video.grad) <= TOLERANCE * video.grad.abs().max().item()


# --- the causal boundary kernel -------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [1, 2, 5])
@pytest.mark.parametrize("with_halo", [False, True])
def test_boundary_kernel_matches_reference_under_triton_interpreter(monkeypatch, frames, with_halo):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from cogvx_mega.kernels.causal_pad import causal_boundary_input
    from cogvx_mega.kernels.causal_pad.op import use_triton
    from cogvx_mega.kernels.causal_pad.ref import causal_boundary_input_ref

    assert use_triton(torch.empty(1))
    generator = torch.Generator().manual_seed(frames)
    x = torch.randn(2, 3, frames, 5, 7, generator=generator, requires_grad=True)  # odd sizes
    halo = torch.randn(2, 3, 2, 5, 7, generator=generator, requires_grad=True) if with_halo else None
    out = causal_boundary_input(x, halo, 2)
    x_ref = x.detach().clone().requires_grad_()
    halo_ref = halo.detach().clone().requires_grad_() if with_halo else None
    expected = causal_boundary_input_ref(x_ref, halo_ref, 2)
    assert torch.equal(out, expected)  # a copy kernel: exact
    grad = torch.randn(out.shape, generator=generator)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    if with_halo:
        assert torch.equal(halo.grad, halo_ref.grad)


class _CopiesOf(torch.utils._python_dispatch.TorchDispatchMode):
    """Records copying ops (clone, copy, contiguous) that return a tensor of `shape`: a copy of the input."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.copies = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        copying = any(word in str(func) for word in ("clone", "copy", "contiguous"))
        if copying and isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.copies.append(str(func))
        return out


@pytest.mark.parametrize("layout", ["time-narrowed", "channels-last"])
def test_boundary_kernel_reads_strided_input_without_copying_it(monkeypatch, layout):
    """The halo path hands the kernel a view (the conv output narrowed to T frames); it must read it through
    its strides: exact against the reference, and no op produces a copy of the input."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from cogvx_mega.kernels.causal_pad import causal_boundary_input
    from cogvx_mega.kernels.causal_pad.ref import causal_boundary_input_ref
    from cogvx_mega.kernels.causal_pad.triton import causal_boundary_input_triton

    generator = torch.Generator().manual_seed(3)
    if layout == "time-narrowed":
        x = torch.randn(2, 3, 9, 5, 7, generator=generator).narrow(2, 0, 6)  # [.., T+pad+1 frames] buffer, first 6
        halo = torch.randn(2, 3, 4, 5, 7, generator=generator)[:, :, 1:3]
    else:
        x = torch.randn(2, 5, 7, 6, 3, generator=generator).permute(0, 4, 3, 1, 2)  # [B, C, T, H, W] view
        halo = torch.randn(2, 5, 7, 2, 3, generator=generator).permute(0, 4, 3, 1, 2)
    assert not x.is_contiguous() and not halo.is_contiguous()
    for given_halo in (halo, None):
        expected = causal_boundary_input_ref(x, given_halo, 2)
        assert torch.equal(causal_boundary_input(x, given_halo, 2), expected)  # the op (dispatches to the kernel)
        recorder = _CopiesOf(x.shape)
        with recorder:  # the kernel's launcher itself, so the mode sees every op it runs
            out = causal_boundary_input_triton(x, given_halo, 2)
        assert torch.equal(out, expected)
        assert recorder.copies == [], f"the input was copied: {recorder.copies}"


# --- converters and loading -------------------------------------------------------------------------------

def test_load_vae_and_convert_round_trip(reference, tmp_path):
    import cogvx_mega
    from cogvx_mega.cli import main

    reference.save_pretrained(tmp_path / "diffusers")
    assert main(["convert", "vae-diffusers-to-project", str(tmp_path / "diffusers"), str(tmp_path / "ours")]) == 0
    assert main(["convert", "vae-project-to-diffusers", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    from diffusers import AutoencoderKLCogVideoX

    back = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "back")
    for key, tensor in reference.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    video = clip(9)
    with torch.no_grad():
        expected = reference.encode(video).latent_dist.mean
        for folder in ("diffusers", "ours"):
            assert max_diff(cogvx_mega.load_vae(str(tmp_path / folder)).encode(video), expected) <= TOLERANCE


def test_sat_vae_names(reference, ours):
    """SAT's names (from its released checkpoints): `down.i.block.j`, `mid.block_1`, decoder `up.i` numbered
    from the lowest resolution, `nin_shortcut`, `downsample` / `upsample`; training-loss tensors ignored."""
    from cogvx_mega.checkpoint.meta import ConversionError
    from cogvx_mega.checkpoint.vae import sat_vae_to_project

    pairs = {
        "encoder.down_blocks.0.downsamplers.0.conv.weight": "encoder.down.0.downsample.conv.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.mid_block.resnets.1.conv2.conv.bias": "encoder.mid.block_2.conv2.conv.bias",
        "decoder.mid_block.resnets.0.norm1.conv_y.conv.weight": "decoder.mid.block_1.norm1.conv_y.conv.weight",
        "decoder.up_blocks.0.resnets.1.norm2.norm_layer.weight": "decoder.up.3.block.1.norm2.norm_layer.weight",
        "decoder.up_blocks.2.upsamplers.0.conv.weight": "decoder.up.1.upsample.conv.weight",
        "decoder.up_blocks.3.resnets.0.conv1.conv.weight": "decoder.up.0.block.0.conv1.conv.weight",
        "encoder.conv_in.conv.weight": "encoder.conv_in.conv.weight",
        "decoder.norm_out.conv_b.conv.bias": "decoder.norm_out.conv_b.conv.bias",
    }
    state = reference.state_dict()
    # a SAT checkpoint built from the documented names for the pairs above, the rest via the same rules
    from cogvx_mega.checkpoint.vae import vae_project_key_to_sat

    for ours_key, sat_key in pairs.items():
        assert vae_project_key_to_sat(ours_key, ours.config) == sat_key
    sat = {vae_project_key_to_sat(k, ours.config): v for k, v in state.items()}
    sat["loss.discriminator.weight"] = torch.zeros(1)
    converted = sat_vae_to_project({f"first_stage_model.{k}": v for k, v in sat.items()}, ours.config)
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    del sat["decoder.up.0.block.0.conv1.conv.weight"]
    with pytest.raises(ConversionError, match="missing"):
        sat_vae_to_project(sat, ours.config)


# --- the command line -------------------------------------------------------------------------------------

def test_vae_cli_encode_decode(reference, ours, tmp_path):
    pytest.importorskip("av")
    from cogvx_mega.cli import main
    from cogvx_mega.vae import io

    reference.save_pretrained(tmp_path / "vae")
    video = clip(9) * 0.5
    io.write_video(str(tmp_path / "clip.mp4"), video)
    decoded_video, _ = io.read_video(str(tmp_path / "clip.mp4"))
    args = ["--vae", str(tmp_path / "vae"), "--device", "cpu"]
    assert main(["vae", "encode", str(tmp_path / "clip.mp4"), str(tmp_path / "z.safetensors"), *args]) == 0
    z, metadata = io.load_latents(str(tmp_path / "z.safetensors"))
    with torch.no_grad():
        assert max_diff(z, ours.encode(decoded_video)) <= TOLERANCE
    assert metadata["frames"] == 9 and metadata["scaled"] is False
    assert main(["vae", "decode", str(tmp_path / "z.safetensors"), str(tmp_path / "out.mp4"), *args]) == 0
    out, _ = io.read_video(str(tmp_path / "out.mp4"))
    assert out.shape == (1, 3, 9, 32, 32)


# --- bad input ----------------------------------------------------------------------------------------------

def test_bad_input_one_clear_error(ours, reference, tmp_path, capsys):
    from cogvx_mega.cli import main
    from cogvx_mega.checkpoint.meta import ConversionError
    from cogvx_mega.checkpoint.vae import read_diffusers_vae_folder
    from cogvx_mega.vae.time_split import shard_sizes

    with pytest.raises(VAEInputError, match=r"8 frames: the causal VAE needs 1 \+ 4k frames"):
        ours.encode(clip(8))
    with pytest.raises(VAEInputError, match="use a CP size of at most 2"):
        shard_sizes(5, 4)  # 5 latent frames cannot give 4 ranks 2 each
    # weights of the wrong shape: a config that says 8 latent channels next to 4-channel weights
    reference.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
    with pytest.raises(ConversionError, match="from another VAE configuration"):
        read_diffusers_vae_folder(str(tmp_path / "vae"))
    # the CLI: one line, exit 2, nothing written
    pytest.importorskip("av")
    from cogvx_mega.vae import io

    reference.save_pretrained(tmp_path / "good")
    io.write_video(str(tmp_path / "clip.mp4"), clip(8) * 0.5)
    status = main(["vae", "encode", str(tmp_path / "clip.mp4"), str(tmp_path / "z.safetensors"),
                   "--vae", str(tmp_path / "good"), "--device", "cpu"])
    errors = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(errors) == 1 and "1 + 4k" in errors[0]
    assert not (tmp_path / "z.safetensors").exists()


def test_time_gather_hands_the_collective_tensors_on_the_input_device(monkeypatch):
    """NCCL gathers only GPU tensors: everything `gather_time` gives a tensor collective must sit on the
    input's device (checked with meta tensors and a recording stand-in for torch.distributed)."""
    from cogvx_mega.vae import time_split

    devices = []

    def all_gather(outputs, tensor, group=None):
        devices.extend([tensor.device, *(out.device for out in outputs)])

    def all_gather_object(outputs, value, group=None):
        outputs[:] = [value, value - 1]  # rank 1 holds one frame fewer

    monkeypatch.setattr(time_split.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(time_split.dist, "all_gather", all_gather)
    monkeypatch.setattr(time_split.dist, "all_gather_object", all_gather_object)
    x = torch.empty(1, 4, 3, 2, 2, device="meta")
    out = time_split.gather_time(x, group=object())
    assert devices and all(device.type == "meta" for device in devices)
    assert out.shape == (1, 4, 5, 2, 2) and out.device.type == "meta"
