"""VAE training losses (issue 29): LPIPS against the `lpips` package (same random weights, its state dict
loaded into ours), the 3D discriminator's shapes and parameter counts, hinge / adaptive weight / R1 against
hand computations, and the GAN switch at gan_start_step."""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch
from torch import nn

from cogvx_mega.vae.discriminator import Discriminator3D, DiscriminatorInputError
from cogvx_mega.vae.lpips import LPIPS
from cogvx_mega.vae.losses import (VAELoss, VAELossConfig, adaptive_weight, hinge_discriminator_sum,
                                   hinge_generator_sum, kl_loss, r1_penalty, reconstruction_sum)

# --- LPIPS ---------------------------------------------------------------------------------------------------


def _torchvision_vgg16_features() -> nn.Sequential:
    """torchvision's vgg16().features layout (configuration D), for a stand-in torchvision."""
    layers, previous = [], 3
    for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(previous, item, 3, padding=1), nn.ReLU(inplace=True)]
            previous = item
    return nn.Sequential(*layers)


@pytest.fixture
def lpips_package(monkeypatch):
    """The `lpips` package; where torchvision is absent (CPU torch here: PyPI's torchvision wheel needs the
    CUDA libtorch) a stand-in `torchvision.models.vgg16` with torchvision's layer layout is put in place."""
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("the lpips package is not installed (pip install lpips --no-deps)")
    if importlib.util.find_spec("torchvision") is None:
        models = types.ModuleType("torchvision.models")
        models.vgg16 = lambda pretrained=False, **_: types.SimpleNamespace(features=_torchvision_vgg16_features())
        for name in ("alexnet", "squeezenet1_1", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
            setattr(models, name, None)
        package = types.ModuleType("torchvision")
        package.models = models
        monkeypatch.setitem(sys.modules, "torchvision", package)
        monkeypatch.setitem(sys.modules, "torchvision.models", models)
    for name in [n for n in sys.modules if n == "lpips" or n.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("lpips")


def _random_lpips(seed: int = 0) -> LPIPS:
    torch.manual_seed(seed)
    module = LPIPS()
    with torch.no_grad():
        for lin in module.lins:  # the package's trained lin weights are non-negative
            lin.model[1].weight.uniform_(0.0, 1.0)
    return module


def test_lpips_equals_the_lpips_package(lpips_package):
    torch.manual_seed(0)
    reference = lpips_package.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        for lin in reference.lins:
            lin.model[1].weight.uniform_(0.0, 1.0)
    ours = LPIPS()
    assert set(ours.state_dict()) == set(reference.state_dict())  # same keys, same layout
    ours.load_state_dict(reference.state_dict(), strict=True)
    a, b = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = reference(a, b)
        got = ours(a, b)
    assert got.shape == expected.shape == (3, 1, 1, 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the package's vgg.pth holds only lin<k> keys: that loads too (lins.<k> are the same convs)
    lin_only = {k: v for k, v in reference.state_dict().items() if not k.startswith("lins.")}
    fresh = LPIPS()
    fresh.load_state_dict(lin_only)
    torch.testing.assert_close(fresh(a, b), expected, atol=1e-5, rtol=0)


def _hand_lpips(state: dict, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS written out with functional ops from a state dict (independent of both modules)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    convs = sorted({int(k.split(".")[2]) for k in state if k.startswith("net.slice") and k.endswith("weight")})
    slice_of = {i: k.split(".")[1] for k in state if k.startswith("net.slice") for i in [int(k.split(".")[2])]}

    def trunk(x):
        taps, x = [], (x - shift) / scale
        for layer, i in enumerate(convs):
            if layer in (2, 4, 7, 10):
                x = torch.nn.functional.max_pool2d(x, 2)
            w, bias = state[f"net.{slice_of[i]}.{i}.weight"], state[f"net.{slice_of[i]}.{i}.bias"]
            x = torch.relu(torch.nn.functional.conv2d(x, w, bias, padding=1))
            if layer in (1, 3, 6, 9, 12):
                taps.append(x)
        return taps

    total = 0
    for k, (fa, fb) in enumerate(zip(trunk(a), trunk(b))):
        fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + (state[f"lin{k}.model.1.weight"] * (fa - fb).pow(2)).sum(1, keepdim=True).mean((2, 3),
                                                                                                     keepdim=True)
    return total


def test_lpips_equals_a_hand_reference_and_loads_from_files(tmp_path):
    ours = _random_lpips(1)
    a, b = torch.rand(2, 2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(a, b), _hand_lpips(ours.state_dict(), a, b), atol=1e-5, rtol=0)
    # real-weight files: torchvision's vgg16 checkpoint keys and the package's vgg.pth keys
    state = ours.state_dict()
    vgg = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": v for k, v in state.items() if k.startswith("net.")}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin") and not k.startswith("lins")}, tmp_path / "vgg.pth")
    loaded = LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    with torch.no_grad():
        torch.testing.assert_close(loaded(a, b), ours(a, b))
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.save({k: v for k, v in vgg.items() if k != "features.28.bias"}, tmp_path / "broken.pth")
    with pytest.raises(KeyError, match="features.28.bias"):
        LPIPS.from_files(tmp_path / "broken.pth", tmp_path / "vgg.pth")


def test_video_lpips_all_frames_or_random_frames():
    ours = _random_lpips(2)
    video, recon = torch.rand(2, 2, 3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        per_frame = ours(video.transpose(1, 2).flatten(0, 1), recon.transpose(1, 2).flatten(0, 1)).view(2, 3)
        torch.testing.assert_close(ours.video_distance(video, recon), per_frame.mean())
        picked = torch.rand(2, 3, generator=torch.Generator().manual_seed(5)).topk(1, dim=1).indices
        expected = per_frame.gather(1, picked).mean()
        got = ours.video_distance(video, recon, frames=1, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, expected)
        assert ours.video_distance(video, video).abs() < 1e-6
    ours.train()
    assert not ours.training  # frozen metric stays in eval mode


# --- discriminator ----------------------------------------------------------------------------------------


def _sat_parameter_count(dim, image_size, frame_num, channels=3, max_dim=512, dim_head=8, heads=16, ff_mult=4):
    """Discriminator3D's parameter count, worked out by hand from SAT's source (video_loss.py, magvit2 and
    taylor_series_linear_attention blocks): not by running SAT's code."""
    h, w = image_size if isinstance(image_size, tuple) else (image_size, image_size)
    levels = int(math.log2(min(h, w)) - 2)
    time_levels = int(math.log2(frame_num))
    dims = [channels] + [min(dim * 4 * 2 ** i, max_dim) for i in range(levels + 1)]
    total = 0
    for index, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        if index < time_levels:  # DiscriminatorBlock3D: conv_res, 2 convs 3x3x3, downsample conv 8o -> o
            total += (i * o + o) + (27 * i * o + o) + (27 * o * o + o) + (8 * o * o + o)
        else:  # DiscriminatorBlock (+ downsample unless last) + LinearSpaceAttention + FeedForward
            total += (i * o + o) + (9 * i * o + o) + (9 * o * o + o)
            total += (4 * o * o + o) if index != len(dims) - 2 else 0
            total += o + 4 * o * heads * dim_head  # RMSNorm gamma, to_q, to_kv, to_out (no biases)
            inner = int(o * ff_mult * 2 / 3)
            total += o + (o * 2 * inner + 2 * inner) + (inner * o + o)
    last = dims[-1]
    total += 9 * last * last + last + (h >> levels) * (w >> levels) * last + 1
    return total


DISCRIMINATOR_CASES = [
    # arguments, parameter count (ours == the SAT-source formula above), input shape, output shape
    (dict(dim=8, image_size=32, frame_num=4, max_dim=64), 581_929, (2, 3, 4, 32, 32), (2,)),
    (dict(dim=16, image_size=(32, 64), frame_num=8, max_dim=128), 2_645_931, (1, 3, 16, 32, 64), (2,)),
]


@pytest.mark.parametrize("kwargs,count,shape,out", DISCRIMINATOR_CASES)
def test_discriminator_counts_and_shape(kwargs, count, shape, out):
    torch.manual_seed(0)
    disc = Discriminator3D(**kwargs)
    assert sum(p.numel() for p in disc.parameters()) == count == _sat_parameter_count(**kwargs)
    logits = disc(torch.randn(shape))
    assert logits.shape == out and torch.isfinite(logits).all()


def test_discriminator_antialiased_and_bad_input():
    disc = Discriminator3D(dim=4, image_size=16, frame_num=2, max_dim=32, antialiased_downsample=True)
    assert disc(torch.randn(1, 3, 2, 16, 16)).shape == (1,)
    with pytest.raises(DiscriminatorInputError, match="multiple of 2"):
        disc(torch.randn(1, 3, 3, 16, 16))
    with pytest.raises(DiscriminatorInputError, match="expected"):
        disc(torch.randn(1, 3, 2, 16, 32))


# --- loss terms ---------------------------------------------------------------------------------------------


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.25, 1.0])
    # real: relu(1-2)=0, relu(0.5)=0.5, relu(2)=2 -> 2.5/3; fake: relu(-1)=0, relu(1.25)=1.25, relu(2)=2 -> 3.25/3
    torch.testing.assert_close(hinge_discriminator_sum(real, fake), torch.tensor(2.5 + 3.25))
    torch.testing.assert_close(hinge_generator_sum(fake), torch.tensor(-(-2.0 + 0.25 + 1.0)))


def test_reconstruction_and_kl_by_hand():
    x, y = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 1.0]])
    torch.testing.assert_close(reconstruction_sum(x, y), torch.tensor(0.5 + 2.0))
    torch.testing.assert_close(reconstruction_sum(x, y, "mse"), torch.tensor(0.25 + 4.0))
    mean, logvar = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # clip 0: 0.5*(1+1-1-0) + 0.5*(0+2-1-ln2); clip 1: 0
    expected = (0.5 + 0.5 * (1 - math.log(2.0))) / 2
    torch.testing.assert_close(kl_loss(mean, logvar), torch.tensor(expected))


def test_adaptive_weight_by_hand():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    nll = (3.0 * w).sum()  # grad (3, 3): norm 3*sqrt(2)
    gan = (w ** 2).sum()  # grad (2, 4): norm sqrt(20)
    got = adaptive_weight(nll, gan, w, disc_weight=0.5)
    torch.testing.assert_close(got, torch.tensor(0.5 * 3 * math.sqrt(2) / (math.sqrt(20) + 1e-4)))
    assert not got.requires_grad
    huge = adaptive_weight((w * 1e9).sum(), (w * 1e-9).sum(), w)
    assert float(huge) == 1e4  # clamped


def test_r1_penalty_by_hand():
    torch.manual_seed(0)
    lin = nn.Linear(4, 1)
    disc = lambda x: lin(x.flatten(1)).squeeze(1)  # noqa: E731
    real = torch.randn(3, 2, 2)
    penalty, logits = r1_penalty(disc, real)
    # d logit_i / d x_i = the linear weight for every clip: penalty = ||w||^2
    torch.testing.assert_close(penalty, lin.weight.pow(2).sum())
    assert logits.shape == (3,)
    penalty.backward()  # has a graph into the discriminator's parameters: d||w||^2/dw = 2w
    torch.testing.assert_close(lin.weight.grad, 2 * lin.weight.detach())


class _TinyVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.last = nn.Conv3d(3, 3, 1)

    def forward(self, video):
        return self.last(video)


def _setup(**config):
    torch.manual_seed(0)
    vae = _TinyVAE()
    disc = Discriminator3D(dim=2, image_size=16, frame_num=2, max_dim=16)
    loss = VAELoss(VAELossConfig(**config), lpips=_random_lpips(3), discriminator=disc)
    video = torch.rand(2, 3, 2, 16, 16) * 2 - 1
    mean, logvar = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2) * 0.1
    return vae, disc, loss, video, mean, logvar


def test_gan_terms_off_before_gan_start_step_and_on_after():
    vae, disc, loss, video, mean, logvar = _setup(gan_start_step=10, r1_weight=0.5)
    recon = vae(video)
    before = loss.generator_loss(video, recon, mean, logvar, step=9, last_layer=vae.last.weight)
    assert before.gan_loss == 0 and before.adaptive_weight == 0
    expected = before.recon_loss + 1e-6 * before.kl_loss + before.perceptual_loss
    torch.testing.assert_close(before.loss.detach(), expected)
    d_before = loss.discriminator_loss(video, recon, step=9)
    assert d_before.loss == 0 and d_before.disc_loss == 0 and not d_before.loss.requires_grad

    after = loss.generator_loss(video, recon, mean, logvar, step=10, last_layer=vae.last.weight)
    assert after.gan_loss != 0 and after.adaptive_weight > 0
    torch.testing.assert_close(after.loss.detach(), expected + after.adaptive_weight * after.gan_loss)
    # the weight is the VQGAN rule on the last layer
    nll = reconstruction_sum(video, recon) / recon.numel() + loss.lpips.video_distance(video, recon)
    logits = disc(recon)  # one window a clip here: the toy discriminator's frame_num is the clip's frame count
    gan = hinge_generator_sum(logits) / logits.numel()
    torch.testing.assert_close(after.adaptive_weight, adaptive_weight(nll, gan, vae.last.weight, 0.5))
    after.loss.backward()
    assert vae.last.weight.grad is not None

    d_after = loss.discriminator_loss(video, recon, step=10)
    real, fake = disc(video), disc(recon.detach())
    torch.testing.assert_close(d_after.disc_loss, hinge_discriminator_sum(real, fake).detach() / real.numel())
    assert d_after.r1_penalty > 0
    torch.testing.assert_close(d_after.loss.detach(), d_after.disc_loss + 0.5 * d_after.r1_penalty)
    disc.zero_grad()
    d_after.loss.backward()
    assert all(p.grad is not None for p in disc.parameters())


def test_plain_disc_weight_when_adaptive_weight_is_off():
    vae, disc, loss, video, mean, logvar = _setup(apply_adaptive_weight=False, disc_weight=0.25,
                                                  perceptual_weight=0.0, reconstruction="mse")
    terms = loss.generator_loss(video, vae(video), mean, logvar, step=0)
    assert float(terms.adaptive_weight) == 0.25 and terms.perceptual_loss == 0
    torch.testing.assert_close(terms.loss.detach(), terms.recon_loss + 1e-6 * terms.kl_loss + 0.25 * terms.gan_loss)
    assert set(terms.as_floats()) == {"loss", "recon_loss", "kl_loss", "perceptual_loss", "gan_loss", "disc_loss",
                                      "adaptive_weight", "r1_penalty"}


def test_discriminator_windows_are_consecutive_frames_after_frame_0():
    from cogvx_mega.vae.losses import ClipShard, VAELossError, discriminator_windows, window_count

    video = torch.arange(9, dtype=torch.float32).view(1, 1, 9, 1, 1).expand(2, 3, 9, 4, 4).clone()
    video[1] += 100  # the second clip
    windows = discriminator_windows(video, 4)  # frames 1..8 of each clip in windows of 4
    assert windows.shape == (4, 3, 4, 4, 4) and window_count(2, 4, ClipShard(), 9) == 4
    assert [windows[i, 0, :, 0, 0].tolist() for i in range(4)] == [[1, 2, 3, 4], [5, 6, 7, 8], [101, 102, 103, 104],
                                                                   [105, 106, 107, 108]]
    # a context-parallel rank's frames 5..8 of the 9-frame clip: one window per clip, frame 0 not among them
    later = discriminator_windows(video[:, :, 5:], 4, ClipShard(frame_offset=5, clip_frames=9))
    assert [later[i, 0, :, 0, 0].tolist() for i in range(2)] == [[5, 6, 7, 8], [105, 106, 107, 108]]
    with pytest.raises(VAELossError, match="disc_frame_num"):
        discriminator_windows(video[:, :, :7], 4, ClipShard(clip_frames=9))  # 6 frames after frame 0
