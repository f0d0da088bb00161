"""The CogVideoX 3D causal VAE (encoder, decoder, diagonal Gaussian posterior).

Parameter names follow diffusers' `AutoencoderKLCogVideoX`, so its state dict loads as is. Every module
takes the `TimeSplit` of the call, which decides how causal convolutions get their previous frames and
over which frames GroupNorm takes its statistics (whole clip, sequential chunks or context parallel).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cogvx_mega.vae.config import VAEConfig
from cogvx_mega.vae.time_split import (ChunkedTime, ContextParallelTime, TimeSplit, VAEInputError, gather_time,
                                       shard_sizes)


class CausalConv3d(nn.Module):
    """A conv3d that is causal in time (k-1 previous frames) and zero-padded in space."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.time_pad = kernel_size - 1
        self.spatial_pad = (kernel_size - 1) // 2
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size)

    def forward(self, x: torch.Tensor, split: TimeSplit) -> torch.Tensor:
        return split.causal_conv(self.conv, x, self.time_pad, self.spatial_pad)


class SpatialNorm3D(nn.Module):
    """GroupNorm modulated by 1x1x1 convs of the latents, nearest-resized to the feature map."""

    def __init__(self, f_channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(num_channels=f_channels, num_groups=groups, eps=1e-6, affine=True)
        self.conv_y = CausalConv3d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, kernel_size=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor, split: TimeSplit) -> torch.Tensor:
        if split.frames > 1 and split.keeps_first_frame():
            first = F.interpolate(zq[:, :, :1], size=(1, *f.shape[-2:]))
            rest = F.interpolate(zq[:, :, 1:], size=(f.shape[2] - 1, *f.shape[-2:])) if f.shape[2] > 1 else None
            zq = first if rest is None else torch.cat([first, rest], dim=2)
        else:
            zq = F.interpolate(zq, size=f.shape[-3:])
        return split.group_norm(self.norm_layer, f) * self.conv_y(zq, split) + self.conv_b(zq, split)


class ResnetBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float,
                 spatial_norm_dim: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        self.spatial = spatial_norm_dim is not None
        if self.spatial:
            self.norm1 = SpatialNorm3D(in_channels, spatial_norm_dim, groups)
            self.norm2 = SpatialNorm3D(out_channels, spatial_norm_dim, groups)
        else:
            self.norm1 = nn.GroupNorm(num_channels=in_channels, num_groups=groups, eps=eps)
            self.norm2 = nn.GroupNorm(num_channels=out_channels, num_groups=groups, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _norm(self, norm, x, zq, split):
        return norm(x, zq, split) if self.spatial else split.group_norm(norm, x)

    def forward(self, x: torch.Tensor, split: TimeSplit, zq: Optional[torch.Tensor] = None) -> torch.Tensor:
        # One statement per step so each intermediate is released as soon as the next exists (peak memory).
        h = self._norm(self.norm1, x, zq, split)
        h = _silu(h)
        h = self.conv1(h, split)
        h = self._norm(self.norm2, h, zq, split)
        h = self.dropout(_silu(h))
        h = self.conv2(h, split)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h.add_(x) if not torch.is_grad_enabled() and h.is_contiguous() else h + x


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place without autograd (a norm's fresh output, used once): one activation less at the peak."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class Downsample3D(nn.Module):
    """Average-pool time by 2 (frame 0 kept apart when the clip's count is odd), then a stride-2 conv2d."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, split: TimeSplit) -> torch.Tensor:
        if self.compress_time:
            keep_first = split.keeps_first_frame()
            body = x[:, :, 1:] if keep_first else x
            if body.shape[2] % 2:
                raise VAEInputError(f"temporal downsampling got {body.shape[2]} frames to pool in pairs; the clip "
                                    f"needs 1 + 4k frames")
            b, c, t, h, w = body.shape
            pooled = body.reshape(b, c, t // 2, 2, h, w).mean(dim=3) if t else body
            x = torch.cat([x[:, :, :1], pooled], dim=2) if keep_first else pooled
            split.frames = (split.frames + 1) // 2
        x = F.pad(x, (0, 1, 0, 1))  # rebinding x releases the unpadded tensor before the conv (peak memory)
        return per_frame(self.conv, x)


class Upsample3D(nn.Module):
    """Nearest x2 in space (and in time, frame 0 kept single when the clip's count is odd), then conv2d."""

    def __init__(self, channels: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, split: TimeSplit) -> torch.Tensor:
        if self.compress_time and split.frames > 1:
            if split.keeps_first_frame():
                first = F.interpolate(x[:, :, 0], scale_factor=2.0)[:, :, None]
                x = torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=2.0)], dim=2) if x.shape[2] > 1 else first
                split.frames = 1 + 2 * (split.frames - 1)
            else:
                x = F.interpolate(x, scale_factor=2.0)
                split.frames = 2 * split.frames
        else:  # space only
            x = per_frame(lambda frames: F.interpolate(frames, scale_factor=2.0), x)
        return per_frame(self.conv, x)


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """A 2D operation ([N, C, H, W] -> [N, C', H', W']) applied to every frame of x [B, C, T, H, W]."""
    b, c, t, h, w = x.shape
    x = fn(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return x.reshape(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)


class DownBlock3D(nn.Module):
    def __init__(self, in_channels, out_channels, layers, groups, eps, add_downsample, compress_time):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, eps)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample3D(out_channels, compress_time)]) if add_downsample else None

    def forward(self, x, split):
        for resnet in self.resnets:
            x = resnet(x, split)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, split)
        return x


class MidBlock3D(nn.Module):
    def __init__(self, channels, groups, eps, spatial_norm_dim=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(channels, channels, groups, eps, spatial_norm_dim)
                                      for _ in range(2)])

    def forward(self, x, split, zq=None):
        for resnet in self.resnets:
            x = resnet(x, split, zq)
        return x


class UpBlock3D(nn.Module):
    def __init__(self, in_channels, out_channels, layers, groups, eps, spatial_norm_dim, add_upsample, compress_time):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, eps,
                                                    spatial_norm_dim) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels, compress_time)]) if add_upsample else None

    def forward(self, x, split, zq):
        for resnet in self.resnets:
            x = resnet(x, split, zq)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, split)
        return x


class Encoder3D(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels
        groups, eps = config.norm_num_groups, config.norm_eps
        self.conv_in = CausalConv3d(config.in_channels, channels[0])
        self.down_blocks = nn.ModuleList()
        previous = channels[0]
        for i, out in enumerate(channels):
            self.down_blocks.append(DownBlock3D(previous, out, config.layers_per_block, groups, eps,
                                                add_downsample=i < len(channels) - 1,
                                                compress_time=i < config.temporal_compression_levels))
            previous = out
        self.mid_block = MidBlock3D(channels[-1], groups, eps)
        self.norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = CausalConv3d(channels[-1], 2 * config.latent_channels)

    def forward(self, x: torch.Tensor, split: TimeSplit) -> torch.Tensor:
        x = self.conv_in(x, split)
        for block in self.down_blocks:
            x = block(x, split)
        x = self.mid_block(x, split)
        x = split.group_norm(self.norm_out, x)
        return self.conv_out(_silu(x), split)


class Decoder3D(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = list(reversed(config.block_out_channels))
        groups, eps, latent = config.norm_num_groups, config.norm_eps, config.latent_channels
        self.conv_in = CausalConv3d(latent, channels[0])
        self.mid_block = MidBlock3D(channels[0], groups, eps, spatial_norm_dim=latent)
        self.up_blocks = nn.ModuleList()
        previous = channels[0]
        for i, out in enumerate(channels):
            self.up_blocks.append(UpBlock3D(previous, out, config.layers_per_block + 1, groups, eps, latent,
                                            add_upsample=i < len(channels) - 1,
                                            compress_time=i < config.temporal_compression_levels))
            previous = out
        self.norm_out = SpatialNorm3D(channels[-1], latent, groups)
        self.conv_out = CausalConv3d(channels[-1], config.out_channels)

    def forward(self, z: torch.Tensor, split: TimeSplit) -> torch.Tensor:
        x = self.conv_in(z, split)
        x = self.mid_block(x, split, z)
        for block in self.up_blocks:
            x = block(x, split, z)
        x = self.norm_out(x, z, split)
        return self.conv_out(_silu(x), split)


class CogVideoXVAE(nn.Module):
    """encode(video [B, 3, T, H, W] in [-1, 1]) -> latents [B, 16, 1 + (T-1)/4, H/8, W/8] (posterior mean, or a
    sample, before the latent scale); decode(latents) -> video. Same layouts as diffusers.

    Time modes (keyword arguments of encode/decode):
    * default: the whole clip in one pass (exact; the parity path against diffusers);
    * `chunk_frames=N`: a sequential walk over N latent frames at a time carrying the causal halo
      forward (long clips on one GPU); GroupNorm per chunk as in diffusers (documented deviation);
    * `group=<CP process group>`: this rank's frames only; halos by point-to-point, GroupNorm statistics
      over the group (exactly the whole clip); the result is this rank's frames unless `gather=True`.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)

    # --- encode ---------------------------------------------------------------------------------------
    def encode_moments(self, video: torch.Tensor, chunk_frames: Optional[int] = None, group=None,
                       gather: bool = False, conv_impl: str = "halo") -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's (mean, log-variance) [B, C, T', H/8, W/8] each, log-variance clamped to [-30, 20] as
        in diffusers: what a latent cache stores, so training can draw a fresh sample every time."""
        moments = self.encode(video, chunk_frames=chunk_frames, group=group, gather=gather, conv_impl=conv_impl,
                              return_moments=True)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, video: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None,
               chunk_frames: Optional[int] = None, group=None, gather: bool = False,
               conv_impl: str = "halo", return_moments: bool = False) -> torch.Tensor:
        self._check_video(video)
        frames = video.shape[2]
        ratio = self.config.temporal_compression_ratio
        latent_frames = 1 + (frames - 1) // ratio
        first_frame = 0  # of the clip's latent frames, the first one `moments` holds
        if group is not None:
            sizes = shard_sizes(latent_frames, dist.get_world_size(group))
            start, count = video_ranges(sizes, ratio)[dist.get_rank(group)]
            split = ContextParallelTime(frames=frames, conv_impl=conv_impl, group=group)
            moments = self.encoder(video[:, :, start:start + count], split)
            if gather:
                moments = gather_time(moments, group)
            else:
                first_frame = sum(sizes[:dist.get_rank(group)])
        elif chunk_frames is not None:
            moments = self._encode_chunked(video, chunk_frames, conv_impl)
        else:
            moments = self.encoder(video, TimeSplit(frames=frames, conv_impl=conv_impl))
        if return_moments:
            return moments
        return posterior(moments, sample, generator, first_frame=first_frame, clip_frames=latent_frames)

    def _encode_chunked(self, video, chunk_frames, conv_impl):
        ratio = self.config.temporal_compression_ratio
        split = ChunkedTime(frames=video.shape[2], conv_impl=conv_impl)
        outputs = []
        for start, stop in _chunks(video.shape[2], chunk_frames * ratio):
            split.begin_chunk(video.shape[2], starts_clip=start == 0)
            outputs.append(self.encoder(video[:, :, start:stop], split))
        return torch.cat(outputs, dim=2)

    # --- decode ---------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, chunk_frames: Optional[int] = None, group=None, gather: bool = False,
               conv_impl: str = "halo") -> torch.Tensor:
        self._check_latents(latents)
        frames = latents.shape[2]
        if group is not None:
            sizes = shard_sizes(frames, dist.get_world_size(group))
            rank = dist.get_rank(group)
            start = sum(sizes[:rank])
            split = ContextParallelTime(frames=frames, conv_impl=conv_impl, group=group)
            video = self.decoder(latents[:, :, start:start + sizes[rank]], split)
            return gather_time(video, group) if gather else video
        if chunk_frames is not None:
            split = ChunkedTime(frames=frames, conv_impl=conv_impl)
            outputs = []
            for start, stop in _chunks(frames, chunk_frames):
                split.begin_chunk(frames, starts_clip=start == 0)
                outputs.append(self.decoder(latents[:, :, start:stop], split))
            return torch.cat(outputs, dim=2)
        return self.decoder(latents, TimeSplit(frames=frames, conv_impl=conv_impl))

    # --- checks ---------------------------------------------------------------------------------------
    def _check_video(self, video: torch.Tensor) -> None:
        c = self.config
        if video.dim() != 5 or video.shape[1] != c.in_channels:
            raise VAEInputError(f"video of shape {tuple(video.shape)}: expected [B, {c.in_channels}, T, H, W]")
        frames, ratio = video.shape[2], c.temporal_compression_ratio
        if (frames - 1) % ratio:
            raise VAEInputError(f"video has {frames} frames: the causal VAE needs 1 + {ratio}k frames "
                             f"(e.g. {1 + ratio * ((frames - 1) // ratio)} or {1 + ratio * ((frames - 1) // ratio + 1)})")
        factor = c.spatial_compression_ratio
        if video.shape[3] % factor or video.shape[4] % factor:
            raise VAEInputError(f"video of {video.shape[3]}x{video.shape[4]} pixels: height and width must be multiples "
                             f"of {factor}")

    def _check_latents(self, latents: torch.Tensor) -> None:
        c = self.config
        if latents.dim() != 5 or latents.shape[1] != c.latent_channels:
            raise VAEInputError(f"latents of shape {tuple(latents.shape)}: expected [B, {c.latent_channels}, T, H, W]")


def posterior(moments: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None,
              first_frame: int = 0, clip_frames: Optional[int] = None) -> torch.Tensor:
    """The diagonal Gaussian's mean (or a draw from it); log-variance clamped to [-30, 20] as in diffusers.

    A draw takes its noise from one tensor for the whole clip (`clip_frames` latent frames), of which
    `moments` holds frames first_frame.. (a context-parallel shard): every rank then draws its own part of
    the noise one process would draw for the clip, so a time split changes nothing in the sample."""
    mean, logvar = moments.chunk(2, dim=1)
    if not sample:
        return mean
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    clip_shape = list(mean.shape)
    clip_shape[2] = clip_frames or mean.shape[2]
    noise = torch.randn(clip_shape, generator=generator, dtype=mean.dtype, device="cpu" if generator is None
                        else generator.device)
    noise = noise[:, :, first_frame:first_frame + mean.shape[2]].to(mean.device)
    return mean + std * noise


def _chunks(frames: int, chunk: int) -> list[tuple[int, int]]:
    """diffusers' frame batches: the first chunk takes the remainder (frame 0 of a 1 + 4k clip, or more)."""
    if chunk < 1:
        raise VAEInputError(f"chunk_frames={chunk}: use a positive number of latent frames per chunk")
    batches = max(frames // chunk, 1)
    remainder = frames % chunk
    bounds = []
    for i in range(batches):
        start = chunk * i + (0 if i == 0 else remainder)
        bounds.append((start, min(chunk * (i + 1) + remainder, frames)))
    return bounds


def video_ranges(latent_sizes: list[int], ratio: int) -> list[tuple[int, int]]:
    """(first video frame, video frames) of each CP rank when latent frames are split as `latent_sizes` (rank 0
    also holds frame 0, which encodes alone)."""
    videos = [1 + ratio * (latent_sizes[0] - 1)] + [ratio * n for n in latent_sizes[1:]]
    return [(sum(videos[:rank]), count) for rank, count in enumerate(videos)]
