"""Model FLOPs of training (the MFU convention: what the model needs, recomputation not counted).

Per layer and clip of S tokens (text and video), hidden D and a 4D MLP: forward = 24 D^2 S (QKV 6, attention
out 2, MLP 16) + 4 S^2 D (scores and the weighted sum over the clip's own tokens; packed clips attend within
themselves only); a training step is 3 x forward (backward = 2 x forward). The patch embedding, the modulation
and the head are left out (under 1% at 2B and 5B).
"""
from __future__ import annotations

from typing import Iterable

# dense bf16 peak TFLOP/s by device name (vendor datasheets; FP8 doubles them)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0,
                    "H100 PCIe": 756.0, "H100": 989.4, "GH200": 989.4, "B200": 2250.0, "A100": 312.0,
                    "L40S": 362.0, "A10G": 70.0}


def training_flops(model_config, clip_tokens: Iterable[int]) -> float:
    """Model FLOPs of one training step over clips of these token counts (one entry per sample or clip)."""
    d, layers = model_config.hidden_size, model_config.num_layers
    return 3.0 * layers * sum(24.0 * d * d * s + 4.0 * s * s * d for s in clip_tokens)


def peak_tflops_of(device_name: str, fp8: bool = False) -> float | None:
    """The datasheet dense peak of a CUDA device from its name (None when unknown: no MFU is reported)."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # the most specific name first
        if key in device_name:
            return PEAK_BF16_TFLOPS[key] * (2 if fp8 else 1)
    return None
