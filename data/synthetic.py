"""A synthetic text-to-video dataset: coloured shapes moving across a dark frame, with matching captions.

Clips are rendered in pixels ([3, T, H, W] in [-1, 1]), then turned into training inputs by two
small fixed random encoders standing in for the VAE and T5:
- `ToyVideoEncoder`: 4x temporal / 8x spatial compression laid out like the CogVideoX VAE
  (latent frame 0 <- frame 0, latent frame k <- frames 4k-3..4k), then a fixed random 1x1 mix
  to the latent channels;
- `ToyTextEncoder`: a fixed random embedding per caption word plus a position code, padded with
  zeros to the model's text length.
Everything is a pure function of the seed, so two processes generate the same dataset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cogvx_mega.vae.io import encode_frames

COLOURS = {"red": (1.0, -0.8, -0.8), "green": (-0.8, 1.0, -0.8), "blue": (-0.8, -0.8, 1.0),
           "yellow": (1.0, 1.0, -0.8), "white": (1.0, 1.0, 1.0)}
SHAPES = ("square", "circle", "bar")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPEEDS = {"slowly": 0.5, "quickly": 1.0}
VOCABULARY = ("<pad>", "a", "moving", *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS)


@dataclass(frozen=True)
class ClipSpec:
    colour: str
    shape: str
    direction: str
    speed: str
    start_row: float
    start_col: float

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.speed} {self.direction}"


def random_clip_spec(generator: torch.Generator) -> ClipSpec:
    def pick(options):
        options = list(options)
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    start = torch.rand(2, generator=generator)
    return ClipSpec(pick(COLOURS), pick(SHAPES), pick(DIRECTIONS), pick(SPEEDS), float(start[0]), float(start[1]))


def render_clip(spec: ClipSpec, frames: int, height: int, width: int) -> Tensor:
    """[3, frames, height, width] in [-1, 1]."""
    rows = torch.arange(height, dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    size = 0.18 * min(height, width)
    d_row, d_col = DIRECTIONS[spec.direction]
    step = SPEEDS[spec.speed] * min(height, width) / max(frames, 1)
    colour = torch.tensor(COLOURS[spec.colour])[:, None, None]
    video = torch.full((3, frames, height, width), -0.9)
    for t in range(frames):
        centre_row = (spec.start_row * height + d_row * step * t) % height
        centre_col = (spec.start_col * width + d_col * step * t) % width
        dr, dc = rows - centre_row, cols - centre_col
        if spec.shape == "square":
            inside = (dr.abs() <= size) & (dc.abs() <= size)
        elif spec.shape == "circle":
            inside = dr**2 + dc**2 <= size**2
        else:
            inside = (dr.abs() <= size * 0.4) & (dc.abs() <= size * 1.6)
        video[:, t] = torch.where(inside[None], colour, video[:, t])
    return video


class ToyVideoEncoder:
    """Fixed random stand-in for the VAE encoder: [3, T, H, W] -> latents [T', C, H/8, W/8]."""

    def __init__(self, latent_channels: int, temporal: int = 4, spatial: int = 8, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.temporal, self.spatial = temporal, spatial
        self.mix = torch.randn(latent_channels, 3, generator=generator) / math.sqrt(3)
        self.bias = 0.1 * torch.randn(latent_channels, generator=generator)

    def __call__(self, video: Tensor) -> Tensor:
        c, t, h, w = video.shape
        groups = [video[:, :1]] + [video[:, 1 + k * self.temporal: 1 + (k + 1) * self.temporal]
                                   for k in range((t - 1) // self.temporal)]
        pooled_time = torch.stack([g.mean(dim=1) for g in groups], dim=0)  # [T', 3, H, W]
        pooled = torch.nn.functional.avg_pool2d(pooled_time, self.spatial)  # [T', 3, H/8, W/8]
        latents = torch.einsum("oc,tchw->tohw", self.mix, pooled) + self.bias[None, :, None, None]
        return latents.contiguous()


class ToyTextEncoder:
    """Fixed random stand-in for T5: caption -> [text_length, dim], zero rows after the caption."""

    def __init__(self, dim: int, text_length: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed + 1)
        self.text_length = text_length
        self.word_table = torch.randn(len(VOCABULARY), dim, generator=generator)
        self.position_table = 0.3 * torch.randn(text_length, dim, generator=generator)
        self.index = {word: i for i, word in enumerate(VOCABULARY)}

    def __call__(self, caption: str) -> Tensor:
        words = caption.split()[: self.text_length]
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise ValueError(f"caption words {unknown} are not in the synthetic vocabulary")
        out = torch.zeros(self.text_length, self.word_table.shape[1])
        ids = torch.tensor([self.index[w] for w in words])
        out[: len(words)] = self.word_table[ids] + self.position_table[: len(words)]
        return out


def generate_synthetic_dataset(num_clips: int, frames: int, height: int, width: int, latent_channels: int,
                               text_dim: int, text_length: int, seed: int = 0):
    """(latents [N, T', C, h, w], text_embeds [N, L, D], captions) — deterministic in the seed."""
    clips = generate_synthetic_clips(num_clips, frames, height, width, latent_channels, text_dim, text_length, seed)
    return clips.latents, clips.text_embeds, clips.captions


@dataclass
class SyntheticClips:
    latents: Tensor
    """[N, T', C, h, w], normalised to zero mean and unit std over the dataset."""
    text_embeds: Tensor
    captions: list
    first_frames: Tensor
    """[N, 3, H, W] uint8: each clip's first frame (the image of image-to-video training)."""
    image_encoder: "ToyImageEncoder"
    """Encodes (noised) first frames as the video latents were encoded: latent frame 0 of the same clip."""


class ToyImageEncoder:
    """A first frame [n, 3, H, W] in [-1, 1] -> [n, 1, C, h, w] through the toy video encoder and the dataset's
    normalisation (the synthetic stand-in for the VAE encoding of an image-to-video model's first frame)."""

    def __init__(self, video_encoder: ToyVideoEncoder, mean: float, std: float):
        self.video_encoder, self.mean, self.std = video_encoder, mean, std

    def __call__(self, frames: Tensor) -> Tensor:
        latents = torch.stack([self.video_encoder(frame[:, None].float().cpu()) for frame in frames])
        return (latents - self.mean) / self.std


def generate_synthetic_clips(num_clips: int, frames: int, height: int, width: int, latent_channels: int,
                             text_dim: int, text_length: int, seed: int = 0) -> SyntheticClips:
    generator = torch.Generator().manual_seed(seed)
    video_encoder = ToyVideoEncoder(latent_channels, seed=seed)
    text_encoder = ToyTextEncoder(text_dim, text_length, seed=seed)
    latents, texts, captions, first = [], [], [], []
    for _ in range(num_clips):
        spec = random_clip_spec(generator)
        video = render_clip(spec, frames, height, width)
        latents.append(video_encoder(video))
        first.append(((video[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
        texts.append(text_encoder(spec.caption))
        captions.append(spec.caption)
    latents = torch.stack(latents)
    mean, std = float(latents.mean()), float(latents.std())
    latents = (latents - mean) / std  # unit scale, as the VAE latent scale intends
    return SyntheticClips(latents, torch.stack(texts), captions, torch.stack(first),
                          ToyImageEncoder(video_encoder, mean, std))


def write_video_file(path, frames, fps: float, codec: str = "libx264", pixel_format: str = "yuv420p",
                     options: dict | None = None):
    """Encode uint8 frames [T, H, W, 3] into a video file (H.264 in MP4, VP9 in WebM, MJPEG in AVI, ...; the
    one writer, `vae.io.encode_frames`): real media for the data path's tests, benchmarks and demo."""
    encode_frames(path, frames, fps, codec, pixel_format, container_options=options)
    return path


def render_clip_uint8(spec: ClipSpec, frames: int, height: int, width: int):
    """`render_clip` as uint8 [T, H, W, 3] frames, ready for `write_video_file`."""
    video = render_clip(spec, frames, height, width)  # [3, T, H, W] in [-1, 1]
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()
