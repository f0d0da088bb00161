"""Per-clip scores for filtering a corpus (`cogvx data score`, `cogvx data split --motion`): motion from dense optical
flow and an aesthetic score from a CLIP-based predictor. Every model is loaded from a path given; nothing downloads.

Motion. For pairs of consecutive source frames (sampled about twice a second, `shots.pair_starts`), downscaled to a
`side`-pixel short side (128 by default), the dense optical flow (u, v) in pixels is computed by OpenCV's Farnebäck
method (`FarnebackMotion`) or by RAFT-small from torchvision with weights loaded by path (`RaftMotion`). A clip's

    motion_score = mean over its pairs of  (128 / s) * mean over pixels of sqrt(u^2 + v^2)

where s is the short side of the frames the flow was computed on: the mean displacement in pixels per source frame
on a frame scaled to a 128-pixel short side, whatever the clip's resolution (1.0 = 1/128 of the short side per
frame; times the clip's fps for per second). A static shot scores about 0, a slow pan 0.5-2, fast action above 5.

Aesthetic. The layout of LAION's "improved aesthetic predictor" (sac+logos+ava1-l14-linearMSE.pth): a CLIP image
embedding (`CLIPVisionModelWithProjection`, ViT-L/14 for the published head: 768 features), L2-normalised, into an
MLP Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1)
(state-dict keys layers.0/2/4/6/7; the ReLU variant, keys layers.0/3/6/9/11, loads too). A clip's aesthetic_score is
the mean over a few frames spread over it (images: the image), on LAION's 1-10 scale for the published head.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np

MOTION_REFERENCE_SIDE = 128


class FarnebackMotion:
    """Motion of a pair of gray frames by OpenCV's Farnebäck dense flow (pyramid 0.5 x 3 levels, 15-pixel windows,
    3 iterations, polynomial 5 / 1.2: OpenCV's sample settings)."""

    name = "farneback"
    view_format = "gray"

    def __init__(self, side: int = MOTION_REFERENCE_SIDE):
        import cv2

        self.cv2 = cv2
        self.side = side

    def __call__(self, first: np.ndarray, second: np.ndarray) -> float:
        flow = self.cv2.calcOpticalFlowFarneback(first, second, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitude = float(np.sqrt((flow.astype(np.float64) ** 2).sum(axis=-1)).mean())
        return magnitude * MOTION_REFERENCE_SIDE / min(first.shape[:2])


class RaftMotion:
    """Motion of a pair of RGB frames by torchvision's RAFT-small (`raft_small`), its weights a state dict loaded
    from `weights` (torchvision's Raft_Small_Weights file, or any of the same architecture)."""

    name = "raft"
    view_format = "rgb24"

    def __init__(self, weights: str, device: str = "cpu", side: int = MOTION_REFERENCE_SIDE, updates: int = 12):
        import torch

        from cogvx_mega.config.errors import ConfigError

        try:
            from torchvision.models.optical_flow import raft_small
        except Exception as error:  # ImportError, or a torchvision built for another torch
            raise ConfigError("--raft-weights", weights, f"RAFT needs torchvision built for this torch "
                                                         f"({type(error).__name__}: {str(error)[:120]})") from None
        state = load_state_dict("--raft-weights", weights)
        model = raft_small(weights=None, progress=False)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ConfigError("--raft-weights", weights, f"not RAFT-small weights "
                                                         f"({str(error).splitlines()[0][:160]})") from None
        self.torch = torch
        self.device = device
        self.model = model.eval().to(device)
        self.side = side
        self.updates = updates

    def __call__(self, first: np.ndarray, second: np.ndarray) -> float:
        torch = self.torch

        def tensor(image):
            return torch.from_numpy(image).permute(2, 0, 1)[None].float().div(127.5).sub(1.0).to(self.device)

        with torch.inference_mode():
            flow = self.model(tensor(first), tensor(second), num_flow_updates=self.updates)[-1][0]
        return float(flow.norm(dim=0).mean()) * MOTION_REFERENCE_SIDE / min(first.shape[:2])


def load_state_dict(flag: str, path: str) -> dict:
    """A state dict from a torch or safetensors file (unwrapped from {'state_dict': ...} or {'model': ...});
    ConfigError naming `flag` when the file is missing or unreadable."""
    import torch

    from cogvx_mega.config.errors import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError(flag, path, "no such file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and safetensors errors alike
        raise ConfigError(flag, path, f"not a readable weights file ({type(error).__name__}: "
                                      f"{str(error)[:160]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ConfigError(flag, path, "holds no state dict (a mapping of names to tensors)")
    return state


def laion_head(state: dict, flag: str = "--aesthetic", path: str = ""):
    """The LAION aesthetic MLP of a state dict: its Linear layers where the keys say (`layers.N.weight`), Dropout
    between them, and ReLU too where the layout has room for it (the ReLU variant). ConfigError otherwise."""
    import torch.nn as nn

    from cogvx_mega.config.errors import ConfigError

    prefix = next((k[: -len("0.weight")] for k in state if k.endswith("layers.0.weight")), None)
    if prefix is None:
        raise ConfigError(flag, path, "not a LAION aesthetic head: no layers.0.weight (expected the keys "
                                      "layers.0/2/4/6/7.weight and .bias of sac+logos+ava1-l14-linearMSE.pth)")
    weights = {int(k[len(prefix):].split(".")[0]): v for k, v in state.items()
               if k.startswith(prefix) and k.endswith(".weight")}
    order = sorted(weights)
    relu = any(b - a == 3 for a, b in zip(order, order[1:]))
    modules: list[nn.Module] = []
    for index in range(order[-1] + 1):
        if index in weights:
            out_features, in_features = weights[index].shape
            modules.append(nn.Linear(in_features, out_features))
        elif relu and index - 1 in weights:
            modules.append(nn.ReLU())
        else:
            modules.append(nn.Dropout(0.0))
    head = nn.Sequential(*modules)
    try:
        head.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    except RuntimeError as error:
        raise ConfigError(flag, path, f"not a LAION aesthetic head ({str(error).splitlines()[0][:160]})") from None
    if weights[order[-1]].shape[0] != 1:
        raise ConfigError(flag, path, f"its last layer gives {weights[order[-1]].shape[0]} values, not one score")
    return head.eval()


class AestheticScorer:
    """CLIP image embedding (a local `CLIPVisionModelWithProjection` folder) -> L2 normalisation -> LAION MLP head
    (a state-dict file). Called with RGB frames, returns one score each. Thread-safe (a lock around the model: one
    forward at a time, each on a clip's frames together)."""

    def __init__(self, head: str, clip: str, device: str = "cpu"):
        import torch

        from cogvx_mega.config.errors import ConfigError

        if not Path(clip).is_dir():
            raise ConfigError("--aesthetic-clip", clip, "no such folder; pass a local CLIP model folder (e.g. "
                                                        "openai/clip-vit-large-patch14 saved with save_pretrained)")
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        try:
            model = CLIPVisionModelWithProjection.from_pretrained(clip, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError("--aesthetic-clip", clip, f"not a CLIP model folder "
                                                        f"({str(error).splitlines()[0][:160]})") from None
        size = int(model.config.image_size)
        if (Path(clip) / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(clip, local_files_only=True)
        else:  # CLIP's own preprocessing at the model's input size
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.head = laion_head(load_state_dict("--aesthetic", head), "--aesthetic", head)
        width = self.head[0].in_features
        if width != model.config.projection_dim:
            raise ConfigError("--aesthetic", head, f"its first layer takes {width} features; the CLIP model at "
                                                   f"--aesthetic-clip gives {model.config.projection_dim}")
        self.torch = torch
        self.device = device
        self.model = model.eval().to(device)
        self.head = self.head.to(device)
        self.side = size
        self.lock = threading.Lock()

    def __call__(self, images: Sequence[np.ndarray]) -> list[float]:
        torch = self.torch
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        with self.lock, torch.inference_mode():
            embeds = self.model(pixel_values=pixels).image_embeds.float()
            embeds = embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return [float(v) for v in self.head(embeds).squeeze(-1).cpu()]
