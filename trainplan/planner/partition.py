"""Split a chain of units into pipeline stages: minimise the slowest stage under memory limits.

The problem (Narayanan et al. 2021 Sec. 3; Alpa's stage construction, Zheng et al. 2022 Sec. 5.2,
in its one-dimensional form): units ``0..n-1`` with times ``t_i`` go to ``p`` contiguous,
non-empty stages; stage ``k`` holding units ``i..j`` must satisfy ``fits(k, i, j)`` (its memory
on a device, which may depend on ``k`` because early 1F1B stages hold more micro-batches in
flight); minimise ``max_k sum(t_i..t_j)``.

Two solvers that return the same optimum:

* :func:`partition_dp` — the textbook dynamic programme, ``O(p · n²)``, the reference.
* :func:`partition` — parametric search: for a bottleneck ``T`` a greedy pass that gives each
  stage the longest feasible prefix decides feasibility exactly (feasibility is monotone under
  shrinking a stage, so the greedy prefix is never worse — the standard exchange argument), and
  bisection over ``T`` finds the optimum. With prefix sums each pass is ``O(p log n)``, so cost does
  not grow with the layer count: a 128-layer model costs what a 12-layer one does.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Fits = Callable[[int, int, int], bool]  # (stage index, first unit, last unit inclusive) -> fits in memory
_BISECT_STEPS = 60  # 2^-60 of the bracket: far below float resolution of any sum


@dataclass(frozen=True, slots=True)
class Partition:
    bounds: tuple[tuple[int, int], ...]  # (first, last) unit of each stage, inclusive
    stage_times: tuple[float, ...]

    @property
    def bottleneck(self) -> float:
        return max(self.stage_times)


def _always(_k: int, _i: int, _j: int) -> bool:
    return True


def _prefix(times: Sequence[float]) -> list[float]:
    return [0.0, *itertools.accumulate(times)]


def _greedy(prefix: list[float], p: int, limit: float, fits: Fits) -> tuple[tuple[int, int], ...] | None:
    """Stages with the longest feasible prefixes under ``limit``; None if p stages do not cover all units."""
    n = len(prefix) - 1
    start, bounds = 0, []
    for k in range(p):
        if start == n:
            return None  # every stage must be non-empty
        stages_left = p - k - 1
        # Longest end with time <= limit, leaving one unit for each remaining stage.
        last = bisect.bisect_right(prefix, prefix[start] + limit) - 2
        last = min(last, n - 1 - stages_left)
        last = _last_fitting(fits, k, start, last)
        if last < start:
            return None
        bounds.append((start, last))
        start = last + 1
    return tuple(bounds) if start == n else None


def _last_fitting(fits: Fits, k: int, start: int, last: int) -> int:
    """Largest ``j`` in ``[start, last]`` with ``fits(k, start, j)``; ``start - 1`` if none (fits is monotone in j)."""
    if last < start or fits(k, start, last):
        return last
    lo, hi = start - 1, last  # fits(k, start, lo) holds (or lo is the sentinel); fits(k, start, hi) fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(k, start, mid):
            lo = mid
        else:
            hi = mid
    return lo


def _result(prefix: list[float], bounds: tuple[tuple[int, int], ...]) -> Partition:
    return Partition(bounds, tuple(prefix[j + 1] - prefix[i] for i, j in bounds))


def partition(times: Sequence[float], p: int, fits: Fits = _always, rel_tol: float = 1e-15) -> Partition | None:
    """The optimal split of ``times`` into ``p`` stages, or None if no split fits in memory.

    ``rel_tol``: the bisection stops when the bracket is this fraction of the bottleneck (the
    returned stage times are exact sums; only the optimality is approximate to ``rel_tol``).
    """
    n = len(times)
    if p < 1 or n < p:
        return None
    prefix = _prefix(times)
    hi = prefix[-1]
    best = _greedy(prefix, p, hi, fits)
    if best is None:
        return None
    lo = max(times) if times else 0.0
    if (found := _greedy(prefix, p, lo, fits)) is not None:
        return _result(prefix, found)
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        found = _greedy(prefix, p, mid, fits)
        if found is None:
            lo = mid
        else:
            # The split found is feasible at its own bottleneck, which may lie well below mid.
            best = found
            hi = max(prefix[j + 1] - prefix[i] for i, j in found)
        if hi - lo <= rel_tol * max(hi, 1e-300):
            break
    return _result(prefix, best)


def partition_dp(times: Sequence[float], p: int, fits: Fits = _always) -> Partition | None:
    """Reference dynamic programme: ``f[k][j]`` = best bottleneck of units ``0..j-1`` in ``k`` stages."""
    n = len(times)
    if p < 1 or n < p:
        return None
    prefix = _prefix(times)
    inf = float("inf")
    f = [[inf] * (n + 1) for _ in range(p + 1)]
    arg = [[-1] * (n + 1) for _ in range(p + 1)]
    f[0][0] = 0.0
    for k in range(1, p + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                if f[k - 1][i] == inf or not fits(k - 1, i, j - 1):
                    continue
                cand = max(f[k - 1][i], prefix[j] - prefix[i])
                if cand < f[k][j]:
                    f[k][j], arg[k][j] = cand, i
    if f[p][n] == inf:
        return None
    bounds, j = [], n
    for k in range(p, 0, -1):
        i = arg[k][j]
        bounds.append((i, j - 1))
        j = i
    return _result(prefix, tuple(reversed(bounds)))


def uniform_blocks(n_blocks: int, chunks: int) -> tuple[tuple[int, int], ...]:
    """Equal contiguous runs of blocks (for interleaved schedules, which need n_blocks % chunks == 0)."""
    if chunks < 1 or n_blocks % chunks:
        raise ValueError(f"{n_blocks} blocks do not split evenly into {chunks} chunks")
    size = n_blocks // chunks
    return tuple((c * size, (c + 1) * size - 1) for c in range(chunks))
