"""VAE training losses (issue 29): reconstruction + KL + LPIPS, then a hinge GAN with a 3D discriminator.

`VAELoss.generator_loss` is the VAE's objective, `VAELoss.discriminator_loss` the discriminator's; both
return `VAELossTerms` (every term detached for logging, `loss` the one to back-propagate).

Generator: loss = recon + kl_weight * KL + perceptual_weight * LPIPS + w * (-mean(D(recon)))
  * recon: mean |x - x'| (L1, default) or mean (x - x')^2 ("mse") over all elements;
  * KL: of the diagonal Gaussian posterior (log-variance clamped to [-30, 20]) to N(0, I), summed over the
    latent's elements of each clip and averaged over the batch (the convention kl_weight ~1e-6 is tuned for);
  * LPIPS on all frames by default, or `lpips_frames` random frames per clip (SAT uses one);
  * w, the GAN weight (0 before `gan_start_step`: the GAN is on when step >= gan_start_step):
    with `apply_adaptive_weight` (default) the VQGAN rule, disc_weight * clamp(||grad_L(recon +
    perceptual_weight * LPIPS)|| / (||grad_L(gan)|| + 1e-4), 0, 1e4), detached, L the decoder's last layer's
    weight; otherwise disc_weight. (SAT computes such a weight, logs it and does not use it.)
Discriminator: loss = mean(relu(1 - D(x))) + mean(relu(1 + D(x'.detach()))) + r1_weight * R1 where
  R1 = mean over clips of ||d sum(D(x)) / dx||^2 (StyleGAN's gamma / 2 is r1_weight), only when r1_weight > 0.

The generator loss back-propagates into the discriminator's parameters too: zero the discriminator's
gradients before its own step (or freeze it around the VAE step), as with any GAN. The discriminator sees
frames 1.. of a 1 + 4k clip (frame 0 is encoded alone; the rest is a multiple of its frame count).

The discriminator judges windows of its `frame_num` frames (SAT's Discriminator3D is built for frame_num
frames): frames 1.. of a 1 + 4k clip (frame 0 is encoded alone) cut into consecutive windows, each a sample;
for a 17-frame clip and frame_num 16 that is the whole clip, as in SAT.

Context parallel (`ClipShard`): each rank holds a block of the clip's frames. The losses it returns are its
share: every term is this rank's sum divided by the whole batch's count (elements, latent clips, frames,
windows), so the shares add up over the CP group to the one-process terms, and gradients summed over the group
(and averaged over data-parallel replicas) are the one-process gradients. The discriminator's windows never
straddle two ranks (`discriminator_windows` refuses a shard that is not whole windows), so each rank judges its
own windows and nothing is gathered; the adaptive weight takes gradients summed over the group
(`shard.reduce_grads`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cogvx_mega.vae.discriminator import Discriminator3D
from cogvx_mega.vae.lpips import LPIPS, frames_kept, pick_frames

ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4


class VAELossError(ValueError):
    """A loss setting or call that cannot work."""


@dataclass
class VAELossConfig:
    reconstruction: str = "l1"  # "l1" or "mse"
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    lpips_frames: Optional[int] = None  # None: all frames; k: k random frames per clip
    disc_weight: float = 0.5
    gan_start_step: int = 0
    apply_adaptive_weight: bool = True
    r1_weight: float = 0.0

    def validate(self) -> "VAELossConfig":
        if self.reconstruction not in ("l1", "mse"):
            raise VAELossError(f"reconstruction={self.reconstruction!r}: use 'l1' or 'mse'")
        for name in ("kl_weight", "perceptual_weight", "disc_weight", "r1_weight"):
            if getattr(self, name) < 0:
                raise VAELossError(f"{name}={getattr(self, name)}: weights are not negative")
        if self.lpips_frames is not None and self.lpips_frames < 1:
            raise VAELossError(f"lpips_frames={self.lpips_frames}: use None (all frames) or a positive count")
        return self


@dataclass
class VAELossTerms:
    """One step's loss terms: `loss` carries the graph, the others are detached scalars for logging."""
    loss: torch.Tensor
    recon_loss: torch.Tensor
    kl_loss: torch.Tensor
    perceptual_loss: torch.Tensor
    gan_loss: torch.Tensor
    disc_loss: torch.Tensor
    adaptive_weight: torch.Tensor
    r1_penalty: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


@dataclass
class ClipShard:
    """The frames of the clips a rank holds (context parallel); the default is the whole clip in one process."""

    frame_offset: int = 0
    """The clip's index of this rank's first video frame."""
    clip_frames: Optional[int] = None
    """The whole clip's video frames (None: this rank holds the whole clip)."""
    reduce_grads: Optional[Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]] = None
    """Gradients of this rank's share -> the whole batch's (summed over CP, averaged over data parallel)."""

    def reduced(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.reduce_grads(grads) if self.reduce_grads is not None else list(grads)


WHOLE_CLIP = ClipShard()


def discriminator_windows(video: torch.Tensor, frame_num: int, shard: ClipShard = WHOLE_CLIP) -> torch.Tensor:
    """[B, C, T, H, W] (this rank's frames) -> the discriminator's samples [B * windows, C, frame_num, H, W]: the
    frames after frame 0 of a 1 + 4k clip (all frames of an even clip) in consecutive windows of frame_num."""
    clip_frames = shard.clip_frames or video.shape[2]
    if shard.frame_offset == 0 and clip_frames % 2 == 1 and clip_frames > 1:
        video = video[:, :, 1:]
    b, c, t, h, w = video.shape
    if t % frame_num:
        raise VAELossError(f"{t} frames (of a {clip_frames}-frame clip, from frame {shard.frame_offset}) do not cut "
                           f"into the discriminator's windows of {frame_num} frames; choose vae_train.disc_frame_num "
                           f"dividing every context-parallel rank's frame count")
    return video.reshape(b, c, t // frame_num, frame_num, h, w).transpose(1, 2).reshape(-1, c, frame_num, h, w)


def window_count(batch: int, frame_num: int, shard: ClipShard, frames: int) -> int:
    """The discriminator's samples in the whole batch (every rank's windows)."""
    clip_frames = shard.clip_frames or frames
    usable = clip_frames - 1 if clip_frames % 2 == 1 and clip_frames > 1 else clip_frames
    return batch * (usable // frame_num)


# --- the terms as functions ------------------------------------------------------------------------------


def reconstruction_sum(video: torch.Tensor, reconstruction: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """The sum over elements of |x - x'| (l1) or (x - x')^2 (mse); the loss divides it by the batch's count."""
    difference = video - reconstruction
    if kind == "l1":
        return difference.abs().sum()
    if kind == "mse":
        return difference.pow(2).sum()
    raise VAELossError(f"reconstruction={kind!r}: use 'l1' or 'mse'")


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), summed over each clip's latent elements, averaged over the batch."""
    logvar = logvar.clamp(-30.0, 20.0)
    per_element = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return per_element.flatten(1).sum(dim=1).mean()


def hinge_generator_sum(logits_fake: torch.Tensor) -> torch.Tensor:
    """-sum D(x'): the hinge GAN's generator term before dividing by the batch's count of windows."""
    return -logits_fake.sum()


def hinge_discriminator_sum(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """sum relu(1 - D(x)) + sum relu(1 + D(x')), before dividing by the batch's count of windows."""
    return F.relu(1.0 - logits_real).sum() + F.relu(1.0 + logits_fake).sum()


def adaptive_weight(nll_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float = 1.0, shard: ClipShard = WHOLE_CLIP) -> torch.Tensor:
    """disc_weight * clamp(||d nll / d last_layer|| / (||d gan / d last_layer|| + 1e-4), 0, 1e4), detached; the
    gradients are the whole batch's (`shard.reduce_grads`) when the losses are a rank's shares."""
    nll_grad, = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    nll_grad, gan_grad = shard.reduced([nll_grad, gan_grad])
    ratio = nll_grad.norm() / (gan_grad.norm() + ADAPTIVE_EPS)
    return (ratio.clamp(0.0, ADAPTIVE_MAX) * disc_weight).detach()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R1, logits): mean over clips of the squared norm of d sum(D(real)) / d real, with a graph for backward."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    grad, = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(dim=1).mean(), logits


def last_decoder_layer(vae: nn.Module) -> torch.Tensor:
    """The weight the adaptive GAN weight is measured on: the decoder's output conv."""
    return vae.decoder.conv_out.conv.weight


# --- the module -------------------------------------------------------------------------------------------


class VAELoss(nn.Module):
    """Holds the frozen LPIPS and the (trainable) discriminator; see the module docstring for the terms."""

    def __init__(self, config: VAELossConfig, lpips: Optional[LPIPS] = None,
                 discriminator: Optional[Discriminator3D] = None):
        super().__init__()
        self.config = config.validate()
        if config.perceptual_weight > 0 and lpips is None:
            raise VAELossError("perceptual_weight > 0 needs an LPIPS module (LPIPS.from_files(vgg, lin))")
        self.lpips = lpips
        self.discriminator = discriminator

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.gan_start_step

    def generator_loss(self, video: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor,
                       logvar: torch.Tensor, step: int, last_layer: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None, picked_frames: Optional[torch.Tensor] = None,
                       shard: ClipShard = WHOLE_CLIP) -> VAELossTerms:
        """The VAE's loss (this rank's share under context parallel, see the module docstring). LPIPS frames
        (`lpips_frames`): `picked_frames` [B, k] clip frame indices, or drawn with `generator`."""
        c = self.config
        if video.shape != reconstruction.shape:
            raise VAELossError(f"video {tuple(video.shape)} and reconstruction {tuple(reconstruction.shape)} differ")
        zero = video.new_zeros(())
        batch, _, frames = video.shape[:3]
        clip_frames = shard.clip_frames or frames
        recon = reconstruction_sum(video, reconstruction, c.reconstruction) / (video.numel() // frames * clip_frames)
        kl = kl_loss(mean, logvar)
        perceptual = self._perceptual(video, reconstruction, generator, picked_frames, shard) \
            if c.perceptual_weight > 0 else zero
        nll = recon + c.perceptual_weight * perceptual
        loss = nll + c.kl_weight * kl
        gan, weight = zero, zero
        if self.gan_active(step):
            frame_num = self.discriminator.frame_num
            logits = self.discriminator(discriminator_windows(reconstruction, frame_num, shard))
            gan = hinge_generator_sum(logits) / window_count(batch, frame_num, shard, frames)
            if c.apply_adaptive_weight and torch.is_grad_enabled():
                if last_layer is None:
                    raise VAELossError("the adaptive GAN weight needs last_layer (last_decoder_layer(vae))")
                weight = adaptive_weight(nll, gan, last_layer, c.disc_weight, shard)
            else:  # no adaptive weight asked for, or no gradients to measure it with (evaluation)
                weight = video.new_tensor(c.disc_weight)
            loss = loss + weight * gan
        return VAELossTerms(loss=loss, recon_loss=recon.detach(), kl_loss=kl.detach(),
                            perceptual_loss=perceptual.detach(), gan_loss=gan.detach(), disc_loss=zero,
                            adaptive_weight=weight.detach(), r1_penalty=zero)

    def _perceptual(self, video, reconstruction, generator, picked_frames, shard: ClipShard) -> torch.Tensor:
        """Mean LPIPS over the clip's frames (or the picked ones): this rank's sum over the whole clip's count."""
        batch, _, frames = video.shape[:3]
        clip_frames = shard.clip_frames or frames
        if self.config.lpips_frames is None:
            return self.lpips.frame_distance_sum(video, reconstruction) / (batch * clip_frames)
        if picked_frames is None:
            picked_frames = pick_frames(batch, clip_frames, self.config.lpips_frames, generator)
        keep = frames_kept(picked_frames.to(video.device), frames, shard.frame_offset)
        return self.lpips.frame_distance_sum(video, reconstruction, keep) / picked_frames.numel()

    def discriminator_loss(self, video: torch.Tensor, reconstruction: torch.Tensor, step: int,
                           shard: ClipShard = WHOLE_CLIP) -> VAELossTerms:
        """The discriminator's loss (this rank's share under context parallel): the hinge loss over the windows
        of the real and reconstructed clips, plus r1_weight times the R1 penalty (mean over windows)."""
        zero = video.new_zeros(())
        if not self.gan_active(step):
            return VAELossTerms(loss=zero, recon_loss=zero, kl_loss=zero, perceptual_loss=zero, gan_loss=zero,
                                disc_loss=zero, adaptive_weight=zero, r1_penalty=zero)
        frame_num = self.discriminator.frame_num
        count = window_count(video.shape[0], frame_num, shard, video.shape[2])
        real = discriminator_windows(video.detach(), frame_num, shard)
        if self.config.r1_weight > 0:
            penalty, logits_real = r1_penalty(self.discriminator, real)
            penalty = penalty * (real.shape[0] / count)
        else:
            penalty, logits_real = zero, self.discriminator(real)
        logits_fake = self.discriminator(discriminator_windows(reconstruction.detach(), frame_num, shard))
        disc = hinge_discriminator_sum(logits_real, logits_fake) / count
        loss = disc + self.config.r1_weight * penalty
        return VAELossTerms(loss=loss, recon_loss=zero, kl_loss=zero, perceptual_loss=zero, gan_loss=zero,
                            disc_loss=disc.detach(), adaptive_weight=zero, r1_penalty=penalty.detach())
