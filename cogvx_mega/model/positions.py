"""Position tables for video tokens (REFERENCE §3), computed the way the diffusers CogVideoX pipelines do.

Tokens are ordered (t, h, w) with w fastest. The arithmetic (dtypes included) follows the reference
so that tables match bit for bit: positions in fp32, sin-cos frequencies in fp64, RoPE angles in fp32.
"""
from __future__ import annotations

import math

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] table laid out [sin | cos], fp64 frequencies."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    angles = torch.outer(positions.reshape(-1), omega)  # [M, dim/2] (fp32 x fp64 -> fp64)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_3d(hidden_size: int, frames: int, height: int, width: int,
              spatial_interpolation_scale: float, temporal_interpolation_scale: float) -> torch.Tensor:
    """CogVideoX-2B absolute positions: [frames*height*width, hidden] = [temporal D/4 | w 3D/8 | h 3D/8]."""
    spatial_dim = 3 * hidden_size // 4
    temporal_dim = hidden_size // 4
    rows = torch.arange(height, dtype=torch.float32) / spatial_interpolation_scale
    cols = torch.arange(width, dtype=torch.float32) / spatial_interpolation_scale
    col_grid = cols[None, :].expand(height, width)  # [h, w] value = column index
    row_grid = rows[:, None].expand(height, width)
    spatial = torch.cat([sincos_1d(spatial_dim // 2, col_grid), sincos_1d(spatial_dim // 2, row_grid)], dim=1)
    times = torch.arange(frames, dtype=torch.float32) / temporal_interpolation_scale
    temporal = sincos_1d(temporal_dim, times)  # [frames, D/4]
    spatial = spatial[None].expand(frames, -1, -1)  # [frames, h*w, 3D/4]
    temporal = temporal[:, None, :].expand(-1, height * width, -1)  # [frames, h*w, D/4]
    return torch.cat([temporal, spatial], dim=-1).reshape(frames * height * width, hidden_size)


def _rope_angles_1d(dim: int, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """[M] positions -> [M, dim] angles, each frequency repeated twice (interleaved pairs)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
    angles = torch.outer(positions, freqs)  # [M, dim/2]
    return angles.repeat_interleave(2, dim=1)


def resize_crop_region(grid_height: int, grid_width: int, base_height: int, base_width: int):
    """Top-left / bottom-right of a grid fitted into the base grid, keeping its aspect (diffusers 1.0 pipelines)."""
    if grid_height / grid_width > base_height / base_width:
        resize_height, resize_width = base_height, int(round(base_height / grid_height * grid_width))
    else:
        resize_width, resize_height = base_width, int(round(base_width / grid_width * grid_height))
    top = int(round((base_height - resize_height) / 2.0))
    left = int(round((base_width - resize_width) / 2.0))
    return (top, left), (top + resize_height, left + resize_width)


def rope_3d_angles(head_dim: int, frames: int, height: int, width: int, *, base_height: int, base_width: int,
                   grid: str) -> torch.Tensor:
    """RoPE angles [frames*height*width, head_dim] = [t 2/8 | h 3/8 | w 3/8] of each head.

    grid='linspace' (CogVideoX 1.0 pipelines): the token grid is fitted into the base grid
    (the training resolution) and positions are spread with linspace, which gives integers at
    the base resolution and fractions elsewhere. grid='slice' (1.5): integer positions, the
    paper's extrapolation choice for multi-resolution training.
    """
    dim_t, dim_h = head_dim // 4, head_dim // 8 * 3
    dim_w = dim_h
    if grid == "linspace":
        (top, left), (bottom, right) = resize_crop_region(height, width, base_height, base_width)
        rows = torch.linspace(top, bottom * (height - 1) / height, height, dtype=torch.float32)
        cols = torch.linspace(left, right * (width - 1) / width, width, dtype=torch.float32)
        times = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32)
    elif grid == "slice":
        rows = torch.arange(height, dtype=torch.float32)
        cols = torch.arange(width, dtype=torch.float32)
        times = torch.arange(frames, dtype=torch.float32)
    else:
        raise ValueError(f"grid={grid!r}: use 'linspace' or 'slice'")
    angles_t = _rope_angles_1d(dim_t, times)[:, None, None, :].expand(frames, height, width, dim_t)
    angles_h = _rope_angles_1d(dim_h, rows)[None, :, None, :].expand(frames, height, width, dim_h)
    angles_w = _rope_angles_1d(dim_w, cols)[None, None, :, :].expand(frames, height, width, dim_w)
    return torch.cat([angles_t, angles_h, angles_w], dim=-1).reshape(frames * height * width, head_dim)


def timestep_sinusoid(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] (integer or fractional) timesteps -> [B, dim] fp32 = [cos(t f) | sin(t f)], f_i = exp(-ln(P) i / (dim/2))."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding
