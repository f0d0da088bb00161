"""Resume: 3 steps, a sharded checkpoint, 3 resumed steps give exactly the losses of 6 uninterrupted steps,
at the same layout and after changing TP, PP or DP (the checkpoint reshards)."""
from __future__ import annotations

import pytest

from launcher import run_ranks
from test_layouts import LAYOUTS, train_layout

SINGLE = ("parallel.tensor_model_parallel_size=1",)

RESUMES = {
    "tp2-same-layout": (LAYOUTS["tp2"], LAYOUTS["tp2"]),
    "tp2-to-tp1": (LAYOUTS["tp2"], {"world": 1, "overrides": list(SINGLE)}),
    "pp2-to-pp1": (LAYOUTS["pp2"], {"world": 1, "overrides": list(SINGLE)}),
    "dp2-to-dp1": ({"world": 2, "overrides": list(SINGLE)}, {"world": 1, "overrides": list(SINGLE)}),
    "pp2-vpp2-to-tp2": (LAYOUTS["pp2-vpp2"], LAYOUTS["tp2"]),
    "dp2-distributed-optimizer-to-dp1": (
        LAYOUTS["dp2-distributed-optimizer"],
        {"world": 1, "overrides": [*SINGLE, "parallel.use_distributed_optimizer=true"]}),
    "tp2-dp2-distributed-optimizer-to-tp1-dp2": (
        {"world": 4, "overrides": ["parallel.tensor_model_parallel_size=2", "parallel.use_distributed_optimizer=true"]},
        {"world": 2, "overrides": [*SINGLE, "parallel.use_distributed_optimizer=true"]}),
    # The async save snapshots step 3 and the run trains a 4th step while the shards are written.
    "tp2-async-save-to-tp1": (
        {**LAYOUTS["tp2"], "overrides": [*LAYOUTS["tp2"]["overrides"], "training.async_save=true"], "steps": 4},
        {"world": 1, "overrides": list(SINGLE)}),
}


@pytest.fixture(scope="module")
def uninterrupted():
    return run_ranks(1, train_layout, SINGLE, range(6))[0]["history"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", sorted(RESUMES))
def test_resume_matches_uninterrupted_run(case, uninterrupted, tmp_path):
    before, after = RESUMES[case]
    saved = run_ranks(before["world"], train_layout, tuple(before["overrides"]), range(before.get("steps", 3)), None,
                      str(tmp_path), 1.0, 3)
    is_async = "training.async_save=true" in before["overrides"]
    # an async checkpoint appears only when finalized; a synchronous one as soon as save() returns
    assert all(rank["visible_before_finalize"] is not is_async for rank in saved), case
    checkpoint = str(tmp_path / "checkpoints" / "step_00000003")
    resumed = run_ranks(after["world"], train_layout, tuple(after["overrides"]), range(3, 6), checkpoint)
    for rank, result in enumerate(resumed):
        losses = [loss for loss, _ in result["history"]]
        expected = [loss for loss, _ in uninterrupted[3:]]
        assert losses == pytest.approx(expected, rel=1e-5), f"{case} rank {rank}"


@pytest.mark.timeout(300)
def test_resume_across_data_parallel_sizes_continues_the_same_run(uninterrupted, tmp_path):
    """DP2 for 2 steps, then DP4 for 2, then DP1 for 2: the losses of one uninterrupted 6-step run."""
    dp = {size: {"world": size, "overrides": list(SINGLE)} for size in (1, 2, 4)}
    first = run_ranks(2, train_layout, tuple(dp[2]["overrides"]), range(0, 2), None, str(tmp_path / "a"), 1.0, 2)
    second = run_ranks(4, train_layout, tuple(dp[4]["overrides"]), range(2, 4),
                       str(tmp_path / "a" / "checkpoints" / "step_00000002"), str(tmp_path / "b"), 1.0, 4)
    third = run_ranks(1, train_layout, tuple(dp[1]["overrides"]), range(4, 6),
                      str(tmp_path / "b" / "checkpoints" / "step_00000004"))
    losses = [first[0]["history"], second[0]["history"], third[0]["history"]]
    assert [loss for phase in losses for loss, _ in phase] == pytest.approx([loss for loss, _ in uninterrupted],
                                                                             rel=1e-5)
    for phase in (first, second):
        assert all(rank["history"] == phase[0]["history"] for rank in phase)
