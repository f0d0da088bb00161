"""A 3D video discriminator for VAE GAN training, written from the structure of THUDM SAT's
`Discriminator3D` (sat/sgm/modules/autoencoding/losses/video_loss.py, built on lucidrains' magvit2 blocks):

* channels: `[channels] + [min(4 * dim * 2**i, max_dim) for i in range(L + 1)]`, L = log2(min(H, W)) - 2;
* the first log2(frame_num) blocks are 3D residual blocks that halve time, height and width (two 3x3x3 convs
  with LeakyReLU(0.1), then a 2x2x2 space-to-depth + 1x1x1 conv; a strided 1x1x1 conv on the residual path;
  sum scaled by 1/sqrt(2)); after them the remaining frames join the batch;
* the other blocks are the 2D version of that block (the last one does not downsample), each followed by a
  residual linear attention over space (RMSNorm, second-order Taylor-series linear attention,
  `linear_attn_heads` x `linear_attn_dim_head`) and a residual GEGLU feed-forward (RMSNorm over channels,
  1x1 convs, inner width int(dim * ff_mult * 2 / 3));
* head: 3x3 conv, LeakyReLU(0.1), flatten, one linear unit.

Same constructor arguments as SAT (`dim, image_size, frame_num, channels=3, max_dim=512,
linear_attn_dim_head=8, linear_attn_heads=16, ff_mult=4, antialiased_downsample=False`); parameter names
are our own. Input [B, C, T, H, W] with T = frame_num * k (k frames remain after the time levels) and H, W
the `image_size`; output: one logit per clip and remaining frame, [B * k].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DiscriminatorInputError(ValueError):
    """A video the discriminator was not built for."""


def _leaky() -> nn.Module:
    return nn.LeakyReLU(0.1)


class Blur(nn.Module):
    """Normalised [1, 2, 1] x [1, 2, 1] blur over height and width, replicate-padded (anti-aliasing)."""

    def __init__(self):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (taps[:, None] * taps[None, :]) / 16.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, 1, *shape[-2:])
        flat = F.conv2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), self.kernel[None, None].to(x.dtype))
        return flat.reshape(shape)


def _space_to_depth(x: torch.Tensor, time: bool) -> torch.Tensor:
    """[B, C, (T 2), (H 2), (W 2)] -> [B, C*8, T, H, W] (or the 2D version), channel-major like einops'
    `b c (f p1) (h p2) (w p3) -> b (c p1 p2 p3) f h w`."""
    if time:
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // 2, 2, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, c * 8, t // 2, h // 2, w // 2)
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


class ResidualDownBlock(nn.Module):
    """Two 3x3(x3) convs + LeakyReLU, optional 2x space-to-depth downsampling, 1x1(x1) residual path."""

    def __init__(self, in_channels: int, out_channels: int, video: bool, downsample: bool = True,
                 antialiased: bool = False):
        super().__init__()
        conv = nn.Conv3d if video else nn.Conv2d
        self.video = video
        self.skip = conv(in_channels, out_channels, 1, stride=2 if downsample else 1)
        self.body = nn.Sequential(conv(in_channels, out_channels, 3, padding=1), _leaky(),
                                  conv(out_channels, out_channels, 3, padding=1), _leaky())
        self.blur = Blur() if antialiased and downsample else None
        self.reduce = conv(out_channels * (8 if video else 4), out_channels, 1) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip(x)
        x = self.body(x)
        if self.reduce is not None:
            if self.blur is not None:
                x = self.blur(x)
            x = self.reduce(_space_to_depth(x, self.video))
        return (x + skip) * (2 ** -0.5)


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(dim) * gamma over the last dim, or over channels (dim 1) of an image."""

    def __init__(self, dim: int, channel_first: bool = False):
        super().__init__()
        self.channel_first = channel_first
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if channel_first else torch.ones(dim))
        self.scale = dim ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1 if self.channel_first else -1) * self.scale * self.gamma


def _taylor_features(x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., 1 + d + d^2]: feature map whose dot products are 1 + q.k + (q.k)^2 / 2."""
    ones = x.new_ones(*x.shape[:-1], 1)
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2) * (0.5 ** 0.5)
    return torch.cat([ones, x, outer], dim=-1)


class LinearSpaceAttention(nn.Module):
    """Residual-free linear attention over the pixels of each image [N, C, H, W] (exp(q.k) replaced by its
    second-order Taylor expansion, so the cost is linear in H*W)."""

    def __init__(self, dim: int, heads: int, dim_head: int, eps: float = 1e-5):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.eps = heads, dim_head, eps
        self.norm = RMSNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # [N, HW, C]

        def split_heads(t):
            return t.reshape(n, h * w, self.heads, self.dim_head).transpose(1, 2)  # [N, heads, HW, d]

        q = split_heads(self.to_q(tokens)) * self.dim_head ** -0.5
        k, v = (split_heads(t) for t in self.to_kv(tokens).chunk(2, dim=-1))
        q, k = _taylor_features(q), _taylor_features(k)
        kv = torch.einsum("bhnd,bhne->bhde", k, v)
        normaliser = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2)).clamp(min=self.eps)
        out = torch.einsum("bhnd,bhde->bhne", q, kv) / normaliser[..., None]
        out = self.to_out(out.transpose(1, 2).reshape(n, h * w, -1))
        return out.transpose(1, 2).reshape(n, c, h, w)


class GEGLUFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        inner = int(dim * mult * 2 / 3)
        self.norm = RMSNorm(dim, channel_first=True)
        self.proj_in = nn.Conv2d(dim, 2 * inner, 1)
        self.proj_out = nn.Conv2d(inner, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(self.norm(x)).chunk(2, dim=1)
        return self.proj_out(F.gelu(gate) * value)


class SpaceBlock(nn.Module):
    """A 2D residual block, then residual linear space attention and residual feed-forward."""

    def __init__(self, in_channels, out_channels, downsample, antialiased, heads, dim_head, ff_mult):
        super().__init__()
        self.conv = ResidualDownBlock(in_channels, out_channels, video=False, downsample=downsample,
                                      antialiased=antialiased)
        self.attention = LinearSpaceAttention(out_channels, heads, dim_head)
        self.feed_forward = GEGLUFeedForward(out_channels, ff_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x + self.attention(x)
        return x + self.feed_forward(x)


def _pair(size) -> tuple[int, int]:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


class Discriminator3D(nn.Module):
    def __init__(self, *, dim: int, image_size, frame_num: int, channels: int = 3, max_dim: int = 512,
                 linear_attn_dim_head: int = 8, linear_attn_heads: int = 16, ff_mult: int = 4,
                 antialiased_downsample: bool = False):
        super().__init__()
        self.image_size = _pair(image_size)
        self.frame_num, self.channels = frame_num, channels
        levels = int(math.log2(min(self.image_size)) - 2)
        self.time_levels = int(math.log2(frame_num))
        widths = [channels] + [min(dim * 4 * 2 ** i, max_dim) for i in range(levels + 1)]
        if self.time_levels > levels:
            raise DiscriminatorInputError(f"frame_num={frame_num} needs {self.time_levels} time levels but "
                                          f"image_size {self.image_size} allows {levels}")
        self.blocks = nn.ModuleList()
        for index, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            if index < self.time_levels:
                self.blocks.append(ResidualDownBlock(c_in, c_out, video=True, antialiased=antialiased_downsample))
            else:
                self.blocks.append(SpaceBlock(c_in, c_out, downsample=index < levels,
                                              antialiased=antialiased_downsample, heads=linear_attn_heads,
                                              dim_head=linear_attn_dim_head, ff_mult=ff_mult))
        last = widths[-1]
        self.final_size = tuple(s // 2 ** levels for s in self.image_size)
        self.head_conv = nn.Conv2d(last, last, 3, padding=1)
        self.head = nn.Linear(self.final_size[0] * self.final_size[1] * last, 1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, C, T, H, W] -> logits [B * T / 2**time_levels]."""
        if video.dim() != 5 or video.shape[1] != self.channels or tuple(video.shape[-2:]) != self.image_size:
            raise DiscriminatorInputError(f"video of shape {tuple(video.shape)}: expected [B, {self.channels}, T, "
                                          f"{self.image_size[0]}, {self.image_size[1]}]")
        step = 2 ** self.time_levels
        if video.shape[2] % step:
            raise DiscriminatorInputError(f"video of {video.shape[2]} frames: the discriminator halves time "
                                          f"{self.time_levels} times and needs a multiple of {step} frames")
        x = video if self.time_levels else video.transpose(1, 2).flatten(0, 1)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index == self.time_levels - 1:
                x = x.transpose(1, 2).flatten(0, 1)  # b c f h w -> (b f) c h w: frames left join the batch
        x = F.leaky_relu(self.head_conv(x), 0.1)
        return self.head(x.flatten(1)).squeeze(1)
