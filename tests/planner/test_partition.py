import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainplan.planner.partition import partition, partition_dp, uniform_blocks


def brute_force(times, p, fits):
    n = len(times)
    best = None
    for cuts in itertools.combinations(range(1, n), p - 1):
        edges = (0, *cuts, n)
        bounds = [(edges[k], edges[k + 1] - 1) for k in range(p)]
        if not all(fits(k, i, j) for k, (i, j) in enumerate(bounds)):
            continue
        value = max(sum(times[i : j + 1]) for i, j in bounds)
        best = value if best is None else min(best, value)
    return best


times_st = st.lists(st.floats(min_value=0.01, max_value=100, allow_nan=False), min_size=1, max_size=9)


@settings(max_examples=200, deadline=None)
@given(times_st, st.integers(min_value=1, max_value=5), st.floats(min_value=0.5, max_value=5), st.floats(0, 0.5))
def test_partition_equals_brute_force_and_dp(times, p, budget, decay):
    # Memory: units weigh 1 each, plus an in-flight term that shrinks with the stage index (1F1B-like).
    def fits(k, i, j):
        return (j - i + 1) * 1.0 + max(0.0, 1 - decay * k) <= budget * 2

    expected = brute_force(times, p, fits)
    fast, ref = partition(times, p, fits), partition_dp(times, p, fits)
    if expected is None:
        assert fast is None and ref is None
        return
    assert ref.bottleneck == pytest.approx(expected, rel=1e-12)
    assert fast.bottleneck == pytest.approx(expected, rel=1e-9)
    for part in (fast, ref):
        assert len(part.bounds) == p
        assert part.bounds[0][0] == 0 and part.bounds[-1][1] == len(times) - 1
        assert all(a[1] + 1 == b[0] for a, b in zip(part.bounds, part.bounds[1:]))
        assert all(fits(k, i, j) for k, (i, j) in enumerate(part.bounds))


def test_uniform_layers_split_evenly_and_heavy_ends_get_fewer_layers():
    blocks = [1.0] * 8
    part = partition(blocks, 4)
    assert part.stage_times == (2.0, 2.0, 2.0, 2.0)
    heavy = [3.0] + [1.0] * 8 + [3.0]  # embedding and LM head as heavy as three layers
    part = partition(heavy, 2)
    assert part.bottleneck == pytest.approx(7.0)


def test_infeasible_and_degenerate_cases():
    assert partition([1.0, 1.0], 3) is None
    assert partition([1.0, 1.0], 2, lambda k, i, j: False) is None
    assert partition([5.0], 1).bounds == ((0, 0),)


def test_memory_checks_grow_logarithmically_with_layers():
    calls = []

    def fits(k, i, j):
        calls.append(1)
        return j - i < 70

    big = [2.0] + [1.0] * 4000 + [2.0]
    part = partition(big, 64, fits)
    assert part.bottleneck == pytest.approx(max(part.stage_times))
    assert part.bottleneck <= 4004 / 64 + 2.0
    assert len(calls) < 64 * 2 * 14 * 62  # stages x (bisect steps) x log2(n) x bottleneck steps


def test_uniform_blocks():
    assert uniform_blocks(8, 4) == ((0, 1), (2, 3), (4, 5), (6, 7))
    with pytest.raises(ValueError, match="do not split evenly"):
        uniform_blocks(10, 4)
