"""Megatron's mixed precision (training.mixed_precision=bf16_params: bf16 weights and compute, fp32 main
gradients and fp32 master weights), run on CPU: it follows the fp32 run, parallel layouts follow one bf16
process, and a resume continues the uninterrupted bf16 run exactly (the fp32 masters are in the checkpoint).

Tolerances: bf16 vs fp32 1e-2 relative over 4 steps (bf16 rounds every activation and weight); a layout vs
one bf16 process 1e-2 (TP splits and re-sums bf16 GEMMs; PP and DP only move bf16 tensors or sum fp32
gradients); resume 1e-6 (the same arithmetic).
"""
from __future__ import annotations

import pytest
import torch

from launcher import run_ranks
from test_layouts import STEPS, layout, train_layout

BF16 = ("training.bf16=true", "training.mixed_precision=bf16_params")
LAYOUTS = {"tp2": layout(2, tp=2), "pp2": layout(2, pp=2), "dp2-distributed-optimizer": layout(
    2, 1, 1, 1, "parallel.use_distributed_optimizer=true")}


@pytest.fixture(scope="module")
def single_bf16():
    return run_ranks(1, train_layout, BF16)[0]


def close(history, reference, rel):
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(history, reference)):
        assert loss == pytest.approx(ref_loss, rel=rel), f"step {step} loss"
        assert norm == pytest.approx(ref_norm, rel=rel), f"step {step} grad norm"


@pytest.mark.timeout(240)
def test_bf16_parameters_follow_the_fp32_run(single_bf16):
    fp32 = run_ranks(1, train_layout)[0]
    close(single_bf16["history"], fp32["history"], rel=1e-2)
    assert single_bf16["history"] != fp32["history"]  # it did run in bf16


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_bf16_layout_follows_one_bf16_process(name, single_bf16):
    spec = LAYOUTS[name]
    for result in run_ranks(spec["world"], train_layout, (*BF16, *spec["overrides"])):
        close(result["history"], single_bf16["history"], rel=1e-2)
        for copy in result["conditioning"]:  # replicated conditioning copies stay equal to the first
            assert torch.equal(copy, result["conditioning"][0])


@pytest.mark.timeout(240)
def test_bf16_resume_continues_the_uninterrupted_run(single_bf16, tmp_path):
    half = STEPS // 2
    run_ranks(1, train_layout, BF16, range(half), None, str(tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{half:08d}"
    resumed = run_ranks(2, train_layout, BF16, range(half, STEPS), str(checkpoint))
    for result in resumed:
        close(result["history"], single_bf16["history"][half:], rel=1e-6)
