"""How a VAE call sees time: the whole clip, a chunk of a sequential walk, or one context-parallel shard.

The VAE's modules hold single-device math and ask a `TimeSplit` for the three things that depend on where
their frames sit in the clip:

* `causal_conv`: a causal temporal convolution needs the k-1 frames before the shard's first frame
  (the "halo"). The whole clip (and the shard that starts it) uses k-1 copies of frame 0; a chunk uses the
  last input frames of the previous chunk; a CP rank receives them from the previous rank by asynchronous
  point-to-point while the interior of the convolution runs. The convolution runs once over the shard with
  zero time padding, then only the first k-1 output frames are recomputed from [halo ; first frames]
  (assembled by `cogvx_mega.kernels.causal_pad`) and written over it: no padded copy of the activation.
* `group_norm`: GroupNorm statistics over the whole clip (CP: reduced over the group, exactly the
  single-process statistics) or over the chunk (the sequential walk, diffusers' behaviour).
* `frames` / `starts_clip`: the clip's frame count at the current resolution level and whether this call
  holds frame 0, which CogVideoX's temporal down/upsampling treats apart when the count is odd.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cogvx_mega.kernels.causal_pad import causal_boundary_input


class VAEInputError(ValueError):
    """Input the VAE cannot process (frame count, size, CP layout); the message names the value and the fix."""


def conv_with_halo(conv: torch.nn.Conv3d, x: torch.Tensor, halo: Optional[torch.Tensor], pad: int,
                   spatial_pad: int, interior: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal conv of x [B, C, T, H, W] given the `pad` frames before it (None: copies of frame 0).

    `interior` is the zero-time-padded convolution of x if the caller already started it (to overlap it
    with receiving the halo). Returns a [B, C_out, T, H', W'] view of that buffer, whose first min(T, pad)
    frames are overwritten with the outputs computed from [halo ; first frames].
    """
    if interior is None:
        interior = zero_halo_conv(conv, x, pad, spatial_pad)
    frames = x.shape[2]
    boundary_input = causal_boundary_input(x, halo, pad)
    boundary = F.conv3d(boundary_input, conv.weight, conv.bias, padding=(0, spatial_pad, spatial_pad))
    out = interior.narrow(2, 0, frames)
    out[:, :, : boundary.shape[2]] = boundary
    return out


def zero_halo_conv(conv: torch.nn.Conv3d, x: torch.Tensor, pad: int, spatial_pad: int) -> torch.Tensor:
    """The convolution with `pad` zero frames on both ends of time: [B, C_out, T + pad, H', W']; frames
    pad..T-1 are final, the first `pad` wait for the halo, the last `pad` are never used."""
    return F.conv3d(x, conv.weight, conv.bias, padding=(pad, spatial_pad, spatial_pad))


def naive_causal_conv(conv: torch.nn.Conv3d, x: torch.Tensor, halo: Optional[torch.Tensor], pad: int,
                      spatial_pad: int) -> torch.Tensor:
    """Pad-and-concatenate: the reference the halo path is measured against (benchmarks/vae_cp.py)."""
    if halo is None:
        halo = x[:, :, :1].expand(-1, -1, pad, -1, -1)
    return F.conv3d(torch.cat([halo, x], dim=2), conv.weight, conv.bias, padding=(0, spatial_pad, spatial_pad))


@dataclass
class TimeSplit:
    """The whole clip in one call (the base case; also the parity path against diffusers)."""

    frames: int
    """The clip's frame count at the current resolution level (the samplers update it)."""
    starts_clip: bool = True
    conv_impl: str = "halo"
    """'halo' (zero-padded conv + recomputed boundary frames) or 'naive' (pad-and-concatenate)."""

    def keeps_first_frame(self) -> bool:
        """CogVideoX keeps frame 0 apart when the clip's frame count is odd (1 + 2k / 1 + 4k frames)."""
        return self.starts_clip and self.frames % 2 == 1

    def causal_conv(self, conv: torch.nn.Conv3d, x: torch.Tensor, pad: int, spatial_pad: int) -> torch.Tensor:
        if pad == 0:
            return F.conv3d(x, conv.weight, conv.bias, padding=(0, spatial_pad, spatial_pad))
        return self._causal_conv(conv, x, pad, spatial_pad)

    def _causal_conv(self, conv, x, pad, spatial_pad):
        halo = self.halo_for(conv, x, pad)
        if self.conv_impl == "naive":
            return naive_causal_conv(conv, x, halo, pad, spatial_pad)
        return conv_with_halo(conv, x, halo, pad, spatial_pad)

    def halo_for(self, conv: torch.nn.Conv3d, x: torch.Tensor, pad: int) -> Optional[torch.Tensor]:
        """The `pad` frames before x (None: x starts the clip, copies of its first frame)."""
        return None

    def group_norm(self, norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():  # a causal conv's output view: normalise in place of a contiguous copy
            return DistributedGroupNorm.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, None)
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


@dataclass
class ChunkedTime(TimeSplit):
    """One chunk of a sequential walk over time (SAT's "fake CP", diffusers' frame batches): the halo of
    each causal conv is carried from the previous chunk; GroupNorm is per chunk, as in diffusers."""

    cache: dict = field(default_factory=dict)

    def begin_chunk(self, frames: int, starts_clip: bool) -> None:
        self.frames, self.starts_clip = frames, starts_clip

    def halo_for(self, conv, x, pad):
        halo = self.cache.get(id(conv))
        if x.shape[2] >= pad:
            tail = x[:, :, -pad:]
        else:  # a chunk shorter than the halo: the older frames come from the previous halo (or frame 0)
            before = halo if halo is not None else x[:, :, :1].expand(-1, -1, pad, -1, -1)
            tail = torch.cat([before, x], dim=2)[:, :, -pad:]
        self.cache[id(conv)] = tail.detach().clone()
        return halo


class _Exchange:
    """State of one causal conv's halo exchange between neighbouring CP ranks (forward and backward)."""

    def __init__(self, group, previous: Optional[int], following: Optional[int], pad: int):
        self.group, self.previous, self.following, self.pad = group, previous, following, pad
        self.requests: list = []
        self.halo: Optional[torch.Tensor] = None
        self.grad_tail: Optional[torch.Tensor] = None
        self.backward_requests: Optional[list] = None
        self._sent: Optional[torch.Tensor] = None  # kept alive until its isend completes

    def start_forward(self, x: torch.Tensor) -> None:
        if self.following is not None:
            self._sent = x[:, :, -self.pad:].detach().contiguous()
            self.requests.append(dist.isend(self._sent, self.following, group=self.group))
        if self.previous is not None:
            b, c, _, h, w = x.shape
            self.halo = x.new_empty(b, c, self.pad, h, w)
            self.requests.append(dist.irecv(self.halo, self.previous, group=self.group))

    def finish_forward(self) -> None:
        for request in self.requests:
            request.wait()
        self.requests, self._sent = [], None

    def start_backward(self, grad_halo: Optional[torch.Tensor], like: torch.Tensor) -> None:
        self.backward_requests = []
        if grad_halo is not None and self.previous is not None:
            self._sent = grad_halo.contiguous()
            self.backward_requests.append(dist.isend(self._sent, self.previous, group=self.group))
        if self.following is not None:
            b, c, _, h, w = like.shape
            self.grad_tail = like.new_empty(b, c, self.pad, h, w)
            self.backward_requests.append(dist.irecv(self.grad_tail, self.following, group=self.group))

    def finish_backward(self, like: torch.Tensor) -> Optional[torch.Tensor]:
        if self.backward_requests is None:
            self.start_backward(None, like)
        for request in self.backward_requests:
            request.wait()
        self.backward_requests, self._sent = None, None
        return self.grad_tail


class _StartExchange(torch.autograd.Function):
    """Identity on x that sends x's last frames forward (and, in backward, adds the gradient they got)."""

    @staticmethod
    def forward(ctx, x, exchange: _Exchange):
        ctx.exchange = exchange
        exchange.start_forward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        exchange = ctx.exchange
        grad_tail = exchange.finish_backward(grad)
        if grad_tail is not None:
            grad = grad.clone()
            grad[:, :, -exchange.pad:] += grad_tail
        return grad, None


class _FinishExchange(torch.autograd.Function):
    """The received halo; in backward its gradient starts back to the previous rank."""

    @staticmethod
    def forward(ctx, x, exchange: _Exchange):
        ctx.exchange = exchange
        exchange.finish_forward()
        return exchange.halo

    @staticmethod
    def backward(ctx, grad_halo):
        ctx.exchange.start_backward(grad_halo, grad_halo)
        return None, None


@dataclass
class ContextParallelTime(TimeSplit):
    """One rank's contiguous block of frames; rank 0 starts the clip. `group` is the CP process group."""

    group: object = None

    def __post_init__(self) -> None:
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.starts_clip = self.rank == 0

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank

    def _causal_conv(self, conv, x, pad, spatial_pad):
        if self.size == 1:
            return super()._causal_conv(conv, x, pad, spatial_pad)
        if x.shape[2] < pad:
            raise VAEInputError(f"a context-parallel shard of {x.shape[2]} frames is shorter than the causal halo "
                                f"({pad} frames): use fewer CP ranks for this clip")
        exchange = _Exchange(self.group, self._global(self.rank - 1) if self.rank > 0 else None,
                             self._global(self.rank + 1) if self.rank < self.size - 1 else None, pad)
        x = _StartExchange.apply(x, exchange)
        # the halo path convolves the shard while the halo is in flight; pad-and-concatenate waits first
        interior = zero_halo_conv(conv, x, pad, spatial_pad) if self.conv_impl == "halo" else None
        if self.rank > 0:
            halo = _FinishExchange.apply(x, exchange)
        else:  # the clip's first shard: only its own send to wait for
            exchange.finish_forward()
            halo = None
        if interior is None:
            return naive_causal_conv(conv, x, halo, pad, spatial_pad)
        return conv_with_halo(conv, x, halo, pad, spatial_pad, interior=interior)

    def group_norm(self, norm, x):
        return DistributedGroupNorm.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, self.group)


class DistributedGroupNorm(torch.autograd.Function):
    """GroupNorm whose statistics cover the frames of every rank in `group` (exactly the whole-clip
    statistics: per-rank mean and M2 combined with Chan's formula in fp64), forward and backward.
    With group None it is a plain GroupNorm that reads strided input without a contiguous copy."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, group):
        b, c = x.shape[:2]
        grouped = x.unflatten(1, (groups, c // groups))
        dims = tuple(range(2, grouped.dim()))
        var, mean = torch.var_mean(grouped, dim=dims, correction=0)  # [B, G]
        count = grouped[0, 0].numel()
        stats = torch.stack([torch.full_like(mean, count, dtype=torch.float64), mean.double(),
                             var.double() * count], dim=-1)  # [B, G, 3]: n, mean, M2
        gathered = [stats]
        if group is not None and dist.get_world_size(group) > 1:
            gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, stats, group=group)
        stats = torch.stack(gathered)  # [R, B, G, 3]
        n = stats[..., 0]
        total = n.sum(0)
        global_mean = (n * stats[..., 1]).sum(0) / total
        m2 = (stats[..., 2] + n * (stats[..., 1] - global_mean) ** 2).sum(0)
        rstd = torch.rsqrt(m2 / total + eps).to(x.dtype)  # [B, G]
        global_mean = global_mean.to(x.dtype)
        per_channel = c // groups
        scale = rstd.repeat_interleave(per_channel, dim=1) * (weight if weight is not None else 1)  # [B, C]
        shift = (bias if bias is not None else 0) - global_mean.repeat_interleave(per_channel, dim=1) * scale
        view = (b, c) + (1,) * (x.dim() - 2)
        out = torch.addcmul(shift.view(view), x, scale.view(view))
        ctx.save_for_backward(x, weight, global_mean, rstd)
        ctx.groups, ctx.group, ctx.total = groups, group, total
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        groups, group = ctx.groups, ctx.group
        b, c = x.shape[:2]
        per_channel = c // groups
        dims = tuple(range(2, x.dim()))
        # per-channel sums of g*x and g over this rank's frames, then over the group
        local = torch.stack([(grad * x).sum(dim=dims), grad.sum(dim=dims)])  # [2, B, C]
        sums = local.clone()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        ds, db = sums[0], sums[1]
        gamma = weight if weight is not None else torch.ones(c, dtype=x.dtype, device=x.device)
        ds_g = (ds * gamma).unflatten(1, (groups, per_channel)).sum(-1)  # [B, G]
        db_g = (db * gamma).unflatten(1, (groups, per_channel)).sum(-1)
        count = ctx.total.to(x.dtype)  # elements per group over the whole clip
        c2 = (db_g * mean - ds_g) * rstd ** 3 / count
        c3 = -c2 * mean - db_g * rstd / count
        view = (b, c) + (1,) * (x.dim() - 2)
        mean_c, rstd_c, c2, c3 = (t.repeat_interleave(per_channel, dim=1) for t in (mean, rstd, c2, c3))  # [B, C]
        grad_x = grad * (rstd_c * gamma).view(view) + x * c2.view(view) + c3.view(view)
        # parameter gradients from this rank's frames only, like every other parameter's: the sum over
        # the CP group (the data-parallel x context-parallel gradient reduction) is the whole-clip gradient
        grad_weight = ((local[0] - mean_c * local[1]) * rstd_c).sum(0) if weight is not None else None
        grad_bias = local[1].sum(0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None


def shard_sizes(latent_frames: int, ranks: int) -> list[int]:
    """Latent frames per CP rank: rank 0 holds the first frame (when the count is odd) plus an even share
    of the rest; ranks 0..r-1 take one more when the rest does not divide. Every rank needs >= 2."""
    first = latent_frames % 2
    base, extra = divmod(latent_frames - first, ranks)
    sizes = [base + (r < extra) for r in range(ranks)]
    sizes[0] += first
    if min(sizes) < 2:
        most = max(1, (latent_frames - first) // 2)
        raise VAEInputError(f"{latent_frames} latent frames do not fit context parallel size {ranks}: every rank "
                         f"needs at least 2 latent frames (8 video frames); use a CP size of at most {most}")
    return sizes


def gather_time(x: torch.Tensor, group) -> torch.Tensor:
    """All ranks' frames concatenated in rank order (ranks may hold different frame counts). The frame
    counts travel as Python objects and the frames on x's own device, as NCCL needs."""
    size = dist.get_world_size(group)
    if size == 1:
        return x
    counts = [None] * size
    dist.all_gather_object(counts, int(x.shape[2]), group=group)
    most = max(counts)
    padded = F.pad(x, (0, 0, 0, 0, 0, most - x.shape[2])).contiguous()
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:, :, :n] for g, n in zip(gathered, counts)], dim=2)

