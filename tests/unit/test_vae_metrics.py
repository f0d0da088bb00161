"""Reconstruction scores of `cogvx vae eval` (`cogvx_mega/vae/metrics.py`): PSNR and SSIM equal scikit-image's on
every frame (SSIM with Gaussian weights, sigma 1.5, population statistics), and flicker is the paper's measure by
hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cogvx_mega.vae import metrics


def clips(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    video = torch.rand(2, 3, 4, 24, 32, generator=generator) * 2 - 1
    reconstruction = (video + 0.2 * torch.randn(video.shape, generator=generator)).clamp(-1, 1)
    return video, reconstruction


def test_psnr_and_ssim_equal_scikit_image():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    video, reconstruction = clips()
    x, y = metrics.to_unit(video).numpy(), metrics.to_unit(reconstruction).numpy()
    for clip in range(2):
        error = np.mean((x[clip] - y[clip]) ** 2)
        assert metrics.psnr(video, reconstruction)[clip].item() == pytest.approx(10 * math.log10(1 / error), abs=1e-9)
        expected = np.mean([skimage_metrics.structural_similarity(
            x[clip, c, t], y[clip, c, t], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=1.0) for c in range(3) for t in range(4)])
        assert metrics.ssim(video, reconstruction)[clip].item() == pytest.approx(expected, abs=1e-9)
    assert metrics.ssim(video, video).tolist() == pytest.approx([1.0, 1.0])


def test_flicker_is_the_change_between_frames_of_the_reconstruction_minus_the_input():
    video = torch.zeros(1, 3, 3, 16, 16) - 1  # a still black clip
    reconstruction = video.clone()
    reconstruction[:, :, 1] = 0.0  # the middle frame grey: 0.5 in [0, 1] units, twice
    assert metrics.flicker(video, reconstruction).item() == pytest.approx(0.5)
    assert metrics.flicker(video, video).item() == 0.0
    scores = metrics.ReconstructionScores.of(video, reconstruction)
    assert scores.flicker == pytest.approx(0.5) and scores.ssim < 1 and scores.psnr > 0


def test_frames_smaller_than_the_window_are_refused():
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(torch.zeros(1, 3, 2, 8, 8), torch.zeros(1, 3, 2, 8, 8))
