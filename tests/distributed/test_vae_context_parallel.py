"""The VAE split over time on CP ranks gives the whole-clip encoder and decoder outputs and input gradients.

Each rank holds a contiguous block of frames (rank 0 also frame 0), exchanges causal-conv halos with its
neighbours and reduces GroupNorm statistics over the group. Outputs are compared frame by frame with one
process running the whole clip; input gradients (of a fixed random projection of the outputs) are
summed over ranks, since each rank's gradient covers only its own frames; so are parameter gradients
(what the data-parallel x context-parallel gradient reduction of VAE training will sum).
"""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks

TOLERANCE = 1e-5
CASES = {
    # name: (CP ranks, video frames, latent frames decoded)
    "cp2": (2, 17, 5),                  # T = 1 + cp*n: 1+2 and 2 latent frames per rank
    "cp4": (4, 33, 9),
    "cp2-uneven": (2, 21, 6),           # 5 latent groups over 2 ranks (3 + 2); an even latent count to decode
}


def tiny_vae():
    from cogvx_mega.vae import CogVideoXVAE, VAEConfig

    torch.manual_seed(0)
    model = CogVideoXVAE(VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                   latent_channels=4, temporal_compression_ratio=4))
    with torch.no_grad():  # non-trivial norms and biases
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def run_vae(rank: int, world_size: int, frames: int, latent_frames: int, parallel: bool) -> dict:
    import torch.distributed as dist

    group = None
    if parallel:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        group = dist.group.WORLD
    model = tiny_vae()
    generator = torch.Generator().manual_seed(1)
    video = (torch.rand(1, 3, frames, 16, 16, generator=generator) * 2 - 1).requires_grad_()
    latents_in = torch.randn(1, 4, latent_frames, 4, 4, generator=generator).requires_grad_()
    encoded = model.encode(video, group=group)
    # a posterior draw with the clip's seed: each rank draws its own frames' part of the clip's noise
    sampled = model.encode(video.detach(), sample=True, generator=torch.Generator().manual_seed(5), group=group)
    if parallel:
        from cogvx_mega.vae.time_split import gather_time

        sampled = gather_time(sampled, group)
    decoded = model.decode(latents_in, group=group)
    # the same fixed projection of the whole outputs, restricted to this rank's frames
    encoded_full = model.encode(video.detach(), group=group, gather=True) if parallel else encoded.detach()
    decoded_full = model.decode(latents_in.detach(), group=group, gather=True) if parallel else decoded.detach()
    start_e = _offset(encoded.shape[2], group)
    start_d = _offset(decoded.shape[2], group)
    w_e = torch.randn(encoded_full.shape, generator=generator)[:, :, start_e:start_e + encoded.shape[2]]
    w_d = torch.randn(decoded_full.shape, generator=generator)[:, :, start_d:start_d + decoded.shape[2]]
    ((encoded * w_e).sum() + (decoded * w_d).sum()).backward()
    return {"encoded": encoded_full, "decoded": decoded_full, "sampled": sampled.detach(), "video_grad": video.grad,
            "latents_grad": latents_in.grad, "local_frames": (encoded.shape[2], decoded.shape[2]),
            "parameter_grads": {name: p.grad for name, p in model.named_parameters()}}


def _offset(local_frames: int, group) -> int:
    import torch.distributed as dist

    if group is None:
        return 0
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([local_frames]), group=group)
    return int(sum(c.item() for c in counts[:dist.get_rank(group)]))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", sorted(CASES))
def test_time_split_vae_matches_whole_clip(case):
    ranks, frames, latent_frames = CASES[case]
    [whole] = run_ranks(1, run_vae, frames, latent_frames, False)
    split = run_ranks(ranks, run_vae, frames, latent_frames, True)
    assert sum(r["local_frames"][0] for r in split) == whole["encoded"].shape[2]
    assert min(r["local_frames"][0] for r in split) >= 2  # every rank really held a block of frames
    for rank, result in enumerate(split):
        for key in ("encoded", "decoded", "sampled"):
            diff = (result[key] - whole[key]).abs().max().item()
            assert diff <= TOLERANCE, f"{case} rank {rank} {key}: max abs diff {diff}"
    for key in ("video_grad", "latents_grad"):
        summed = sum(result[key] for result in split)
        diff = (summed - whole[key]).abs().max().item()
        assert diff <= TOLERANCE * max(1.0, whole[key].abs().max().item()), f"{case} {key}: max abs diff {diff}"
    # parameter gradients are per rank (its frames); their sum over CP is the whole-clip gradient
    for name, expected in whole["parameter_grads"].items():
        summed = sum(result["parameter_grads"][name] for result in split)
        diff = (summed - expected).abs().max().item()
        assert diff <= TOLERANCE * max(1.0, expected.abs().max().item()), f"{case} {name}: max abs diff {diff}"
