"""LPIPS (Zhang et al. 2018) with a VGG16 trunk, as a frozen perceptual loss for VAE training.

The module tree and state-dict keys are those of the `lpips` package's `LPIPS(net='vgg')`:
`scaling_layer.shift/scale`, `net.slice1..5.<i>.weight/bias` (torchvision's `vgg16().features` split after
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, with torchvision's layer indices), `lin0..lin4.model.1.weight`
(1x1 convs to one channel, no bias) and the same convs again under `lins.0..4`. A state dict of that package
loads as is; real weights load from two local files (`from_files`): torchvision's VGG16 checkpoint
(`features.<i>.*` keys) and the package's `weights/v0.1/vgg.pth` (`lin<k>.model.1.weight`). Nothing downloads.

Differences that do not change a value: no dropout in front of the linear layers (the loss is frozen and
always evaluated as in the package's eval mode), and ReLUs are not in place.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

# VGG16 "D" configuration: channels of the 3x3 convs, "M" a 2x2 max pool
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# torchvision feature indices where each LPIPS slice ends (exclusive): after relu1_2 .. relu5_3
_SLICE_ENDS = (4, 9, 16, 23, 30)
CHANNELS = (64, 128, 256, 512, 512)


class LPIPSInputError(ValueError):
    """Inputs LPIPS cannot compare (shape mismatch, wrong channel count, bad frame choice)."""


class ScalingLayer(nn.Module):
    """Maps [-1, 1] RGB to the ImageNet-normalised range the trunk was trained on."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


def _vgg16_layers() -> list[nn.Module]:
    layers: list[nn.Module] = []
    previous = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(previous, item, kernel_size=3, padding=1), nn.ReLU()]
            previous = item
    return layers


class VGG16Slices(nn.Module):
    """torchvision's vgg16 features 0..29, cut into five slices; forward returns each slice's output."""

    def __init__(self):
        super().__init__()
        layers = _vgg16_layers()
        start = 0
        for number, end in enumerate(_SLICE_ENDS, start=1):
            piece = nn.Sequential()
            for index in range(start, end):
                piece.add_module(str(index), layers[index])
            setattr(self, f"slice{number}", piece)
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for number in range(1, len(_SLICE_ENDS) + 1):
            x = getattr(self, f"slice{number}")(x)
            outputs.append(x)
        return outputs


class NetLinLayer(nn.Module):
    """A 1x1 conv from C channels to one, no bias; the parameter sits at `model.1` as in the package."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each pixel's feature vector divided by its L2 norm (eps added to the norm, as in the package)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG distance. `forward(a, b)` on images [N, 3, H, W] in [-1, 1] gives [N, 1, 1, 1];
    `video_distance` applies it to videos [B, 3, T, H, W] frame by frame and returns the mean."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for k, channels in enumerate(CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(channels))
        self.lins = nn.ModuleList([getattr(self, f"lin{k}") for k in range(len(CHANNELS))])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a frozen metric: nothing in it depends on the mode, kept in eval anyway

    # --- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_files(cls, vgg_path: str | os.PathLike, lin_path: str | os.PathLike) -> "LPIPS":
        """LPIPS with torchvision's VGG16 weights (`vgg16-397923af.pth`: `features.<i>.weight/bias`; a bare
        `<i>.weight` features dict or `net.slice*` keys also load) and the package's linear layers
        (`vgg.pth`: `lin<k>.model.1.weight`). Missing tensors are an error; classifier weights are ignored."""
        module = cls()
        module.load_state_dict({**module._trunk_state(_load(vgg_path)), **module._lin_state(_load(lin_path)),
                                **{k: v for k, v in module.state_dict().items() if k.startswith("scaling_layer.")}})
        return module

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also accepts the package's own file layout, where only `lin<k>` (not `lins.<k>`) keys are stored."""
        state = dict(state_dict)
        for k in range(len(CHANNELS)):
            for a, b in ((f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight"),
                         (f"lins.{k}.model.1.weight", f"lin{k}.model.1.weight")):
                if a in state and b not in state:
                    state[b] = state[a]
        return super().load_state_dict(state, strict=strict, assign=assign)

    def _trunk_state(self, state: dict) -> dict:
        out = {}
        start = 0
        for number, end in enumerate(_SLICE_ENDS, start=1):
            for index in range(start, end):
                if not isinstance(getattr(self.net, f"slice{number}")[index - start], nn.Conv2d):
                    continue
                for name in ("weight", "bias"):
                    target = f"net.slice{number}.{index}.{name}"
                    for source in (f"features.{index}.{name}", f"{index}.{name}", target):
                        if source in state:
                            out[target] = state[source]
                            break
                    else:
                        raise KeyError(f"VGG16 weights: no tensor for {target} (looked for features.{index}.{name})")
            start = end
        return out

    def _lin_state(self, state: dict) -> dict:
        out = {}
        for k in range(len(CHANNELS)):
            for source in (f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight"):
                if source in state:
                    out[f"lin{k}.model.1.weight"] = out[f"lins.{k}.model.1.weight"] = state[source]
                    break
            else:
                raise KeyError(f"LPIPS linear layers: no tensor for lin{k}.model.1.weight")
        return out

    # --- distance -----------------------------------------------------------------------------------------
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
            raise LPIPSInputError(f"LPIPS compares two images of one shape [N, 3, H, W]: got {tuple(a.shape)} and "
                                  f"{tuple(b.shape)}")
        n = a.shape[0]
        features = self.net(self.scaling_layer(torch.cat([a, b], dim=0)))  # one trunk pass for both
        total = 0
        for lin, feature in zip(self.lins, features):
            fa, fb = _unit_channels(feature[:n]), _unit_channels(feature[n:])
            total = total + lin((fa - fb).pow(2)).mean(dim=(2, 3), keepdim=True)
        return total

    def video_distance(self, video: torch.Tensor, reconstruction: torch.Tensor, frames: Optional[int] = None,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Mean LPIPS over the frames of videos [B, 3, T, H, W]: all frames (frames=None, the default), or
        `frames` distinct frames per clip drawn at random with `generator` (SAT draws one per clip)."""
        self._check_videos(video, reconstruction)
        b, t = video.shape[0], video.shape[2]
        if frames is None:
            return self.frame_distance_sum(video, reconstruction) / (b * t)
        keep = frames_kept(pick_frames(b, t, frames, generator), t)
        return self.frame_distance_sum(video, reconstruction, keep) / (b * frames)

    def frame_distance_sum(self, video: torch.Tensor, reconstruction: torch.Tensor,
                           keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sum of the LPIPS distances of the frames of videos [B, 3, T, H, W] (with `keep` [B, T] bool: of
        the frames it marks), a 0-dim tensor."""
        self._check_videos(video, reconstruction)
        b, c, t, h, w = video.shape
        a, r = video.transpose(1, 2).reshape(b * t, c, h, w), reconstruction.transpose(1, 2).reshape(b * t, c, h, w)
        if keep is not None:
            index = keep.reshape(-1).nonzero().squeeze(1)
            if index.numel() == 0:  # none of this rank's frames picked: a zero that still joins the graph
                return reconstruction.sum() * 0.0
            a, r = a.index_select(0, index), r.index_select(0, index)
        return self(a, r).sum()

    @staticmethod
    def _check_videos(video: torch.Tensor, reconstruction: torch.Tensor) -> None:
        if video.shape != reconstruction.shape or video.dim() != 5:
            raise LPIPSInputError(f"video LPIPS needs two [B, 3, T, H, W] tensors of one shape: got "
                                  f"{tuple(video.shape)} and {tuple(reconstruction.shape)}")


def frames_kept(picked: torch.Tensor, frames: int, first_frame: int = 0) -> torch.Tensor:
    """[B, frames] bool: which of the `frames` frames from clip frame `first_frame` on (a context-parallel rank's)
    are among the clip frame indices `picked` [B, k]."""
    local = picked - first_frame
    keep = torch.zeros(picked.shape[0], frames, dtype=torch.bool, device=picked.device)
    inside = (local >= 0) & (local < frames)
    rows = torch.arange(picked.shape[0], device=picked.device)[:, None].expand_as(local)
    keep[rows[inside], local[inside]] = True
    return keep


def pick_frames(batch: int, clip_frames: int, frames: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[batch, frames] distinct frame indices per clip, drawn with `generator` (uniform without replacement)."""
    if not 1 <= frames <= clip_frames:
        raise LPIPSInputError(f"frames={frames}: choose between 1 and the clip's {clip_frames} frames")
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(batch, clip_frames, generator=generator, device=device).topk(frames, dim=1).indices


def _load(path: str | os.PathLike) -> dict:
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise KeyError(f"{os.fspath(path)}: expected a state dict, found {type(state).__name__}")
    return state


def spatial_features(module: LPIPS, x: torch.Tensor) -> list[torch.Tensor]:
    """The five unit-normalised trunk features of images x (for inspection and tests)."""
    return [_unit_channels(f) for f in module.net(module.scaling_layer(x))]


__all__ = ["LPIPS", "LPIPSInputError", "CHANNELS"]
