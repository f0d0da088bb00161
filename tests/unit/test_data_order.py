"""The order as arithmetic (`data/order.py`): keyed permutations are permutations (exhaustively at small sizes,
by sampling at 35M), every usable clip is drawn once per epoch, ranks read disjoint slots at any DP size, and
the order of a step depends on nothing but (seed, step)."""
from __future__ import annotations

import numpy as np
import pytest

from cogvx_mega.data.order import BucketedBatches, ClipRange, KeyedPermutation, derive_key


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 17, 64, 100, 1000, 4097])
def test_keyed_permutation_is_a_permutation(n):
    for key in (0, 1, derive_key("clips", 7, 3, "49x480x720")):
        perm = KeyedPermutation(n, key)
        out = perm(np.arange(n))
        assert sorted(out.tolist()) == list(range(n))
        assert [perm(i) for i in range(min(n, 50))] == out[:50].tolist()  # scalar and array agree


def test_keyed_permutation_at_paper_scale_is_injective_on_a_sample_and_depends_on_the_key():
    n = 35_000_000
    perm = KeyedPermutation(n, derive_key("clips", 0, 0, "49x480x720"))
    sample = np.random.default_rng(0).choice(n, 200_000, replace=False)
    out = perm(sample)
    assert out.min() >= 0 and out.max() < n and np.unique(out).size == sample.size
    other = KeyedPermutation(n, derive_key("clips", 0, 1, "49x480x720"))(sample)
    assert (other != out).mean() > 0.99
    # shuffled, not shifted: neighbours land far apart
    assert np.median(np.abs(np.diff(perm(np.arange(10_000))))) > n / 10


def test_clip_range_selects_around_holes():
    clips = ClipRange(10, [0, 3, 4, 9])
    assert list(clips) == [1, 2, 5, 6, 7, 8] and len(clips) == 6
    assert clips.select([0, 5]).tolist() == [1, 8]
    assert ClipRange.of([2, 5, 7]) == [2, 5, 7]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_every_usable_clip_once_per_epoch_and_ranks_disjoint(dp):
    usable = {"a": ClipRange(23, [4, 11]), "b": list(range(0, 40, 3)), "c": [5]}
    global_batch = 4
    order = BucketedBatches(usable)
    per = order.batches_per_epoch(global_batch)
    assert per == 21 // 4 + 14 // 4
    for epoch in range(3):
        seen = []
        for step in range(epoch * per, (epoch + 1) * per):
            bucket, clips = order.batch_of_step(step, global_batch, seed=9)
            assert len(clips) == global_batch
            shares = [clips[r * (global_batch // dp):(r + 1) * (global_batch // dp)] for r in range(dp)]
            assert sum(shares, []) == clips
            seen.extend((bucket, c) for c in clips)
        assert len(seen) == len(set(seen))  # nothing twice in an epoch
        usable_set = {(b, c) for b, cs in usable.items() for c in cs}
        assert set(seen) <= usable_set
        # what is left out is each bucket's remainder of fewer than a batch
        for bucket in usable:
            left = len(usable[bucket]) - sum(1 for b, _ in seen if b == bucket)
            assert 0 <= left < global_batch


def test_the_step_is_a_function_of_seed_and_step_only():
    usable = {"a": ClipRange(1000, [3]), "b": ClipRange(500)}
    first = BucketedBatches(usable)
    steps = [7, 0, 300, 5, 299, 10_000, 7]
    expected = [first.batch_of_step(s, 8, seed=1) for s in steps]
    fresh = [BucketedBatches(usable).batch_of_step(s, 8, seed=1) for s in steps]  # a resume at each step
    assert fresh == expected
    assert expected[0] == expected[-1]
    assert [first.batch_of_step(s, 8, seed=2) for s in steps] != expected
    # buckets drawn in proportion to their batches over an epoch
    per = first.batches_per_epoch(8)
    counts = {"a": 0, "b": 0}
    for s in range(per):
        counts[first.batch_of_step(s, 8, seed=1)[0]] += 1
    assert counts == {"a": 999 // 8, "b": 500 // 8}


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0])
def test_mixed_steps_keep_the_ratio_and_number_each_stream_from_zero(ratio):
    from cogvx_mega.data.order import mixed_step

    steps = [mixed_step(s, ratio) for s in range(3000)]
    images = [n for is_image, n in steps if is_image]
    videos = [n for is_image, n in steps if not is_image]
    assert images == list(range(len(images))) and videos == list(range(len(videos)))
    assert abs(len(images) - ratio * 3000) <= 1
    late = 10**12
    assert mixed_step(late, ratio) == mixed_step(late, ratio)
    count = sum(mixed_step(s, ratio)[0] for s in range(late, late + 1000))
    assert abs(count - ratio * 1000) <= 1
