"""The auto-planner: enumerate layouts, cost each, keep the fastest that fits, explain the rest.

Pure: reads a :class:`ModelCosts` table and a spec, returns ranked evaluations; no I/O, no torch,
no globals. Deterministic: candidates are costed in a fixed order and ties are broken by the
layout tuple, so the same input gives the same plan.

Speed: every layout is costed with O(1) stage sums and the O(p log n) partition
(:mod:`trainplan.planner.partition`); layouts whose lower bound (perfectly balanced compute, no
bubble, no communication) cannot beat the current k-th best are skipped, and so are layouts whose
model states alone exceed the device memory. The best few are then re-timed with the event
simulation of their pipeline schedule (:mod:`trainplan.planner.schedule`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, replace

from trainplan.ir.spec import ParallelSpec
from trainplan.planner import cost
from trainplan.planner.evaluate import Context, Evaluation, UnitTimes, evaluate, pipeline_waits, prefix_sums, unit_times
from trainplan.planner.model_costs import ModelCosts
from trainplan.planner.schedule import compiled, simulate
from trainplan.planner.space import Layout, layouts

REFINE_TOP = 8  # candidates re-timed by event simulation
REFINE_WITHIN = 0.05  # ... if their estimate is within this fraction of the best estimate
REFINE_MAX_ACTIONS = 8192  # larger schedules keep the closed form (their stages are near-uniform chunks)
MAX_INFEASIBLE_KEPT = 5
PROGRESS_EVERY = 2048


@dataclass(frozen=True, slots=True)
class SearchResult:
    ranked: tuple[Evaluation, ...]  # feasible, fastest first (the winner is ranked[0])
    infeasible: tuple[Evaluation, ...]  # closest to fitting first
    candidates: int
    evaluated: int
    feasible: int


def _state_lower_bound(model: ModelCosts, lay: Layout, ctx: Context) -> float:
    """Bytes of model states a device holds at least: parameters spread evenly over tp·pp."""
    per_device = model.params / (lay.tp * lay.pp)
    return cost.model_state_bytes(per_device, lay.zero, lay.dp, ctx.precision, ctx.optimizer).total  # type: ignore[arg-type]


def _key(e: Evaluation) -> tuple[float, Layout]:
    return (e.step_time, e.layout)


def search(
    model: ModelCosts,
    parallel: ParallelSpec,
    ctx: Context,
    keep: int = 10,
    refine_top: int = REFINE_TOP,
    progress: Callable[[int, int], None] | None = None,
) -> SearchResult:
    """The ``keep + 1`` fastest layouts that fit (winner first) and the closest that do not.

    ``refine_top`` best estimates are re-timed by event simulation before the final ranking;
    ``progress(candidates, evaluated)`` is called every ``PROGRESS_EVERY`` candidates.
    """
    units, blocks = len(model.units), model.blocks
    # Dedicated parameter servers take devices of their own: the mesh covers the rest (the workers).
    world, limit = ctx.cluster.world_size - parallel.dedicated_ps_servers(), float(ctx.cluster.device.memory)
    best: list[tuple[float, _neg, Evaluation]] = []  # min-heap on -time: best[0] is the slowest kept
    infeasible: list[Evaluation] = []
    candidates = evaluated = feasible = 0
    width = keep + refine_top
    unit_cache: dict[tuple, tuple[UnitTimes, object, float]] = {}  # times, prefix sums, one micro-batch's work
    fitted: set[tuple] = set()
    for lay in layouts(parallel, world, ctx.global_batch, units, blocks, model.facts):
        candidates += 1
        if progress is not None and candidates % PROGRESS_EVERY == 0:
            progress(candidates, evaluated)
        if _dominated(lay, fitted):
            continue
        bound = _state_lower_bound(model, lay, ctx)
        if bound > limit and len(infeasible) >= MAX_INFEASIBLE_KEPT and bound >= infeasible[-1].peak_memory:
            continue  # cannot come closer to fitting than the candidates already kept
        times_key = (lay.tp, lay.micro_batch, lay.recompute, lay.sequence_parallel)
        if times_key not in unit_cache:
            ut = unit_times(model, lay, ctx)
            unit_cache[times_key] = (ut, prefix_sums(model, ut), sum(ut.fwd) + sum(ut.bwd))
        ut, px, work = unit_cache[times_key]
        if len(best) >= width and _pipeline_lower_bound(lay, work) > -best[0][0]:
            continue
        ev = evaluate(model, lay, ctx, ut, px)  # type: ignore[arg-type]
        evaluated += 1
        if not ev.fits:
            infeasible = _keep_closest(infeasible, ev)
            continue
        feasible += 1
        fitted.add(_fit_key(lay))
        item = (-ev.step_time, _neg(lay), ev)
        if len(best) < width:
            heapq.heappush(best, item)
        elif item > best[0]:
            heapq.heapreplace(best, item)
    ranked = sorted((ev for _, _, ev in best), key=_key)
    close = [ev for ev in ranked[:refine_top] if ev.step_time <= ranked[0].step_time * (1 + REFINE_WITHIN)]
    refined = sorted([*(refine(ev, model, ctx) for ev in close), *ranked[len(close) :]], key=_key)
    return SearchResult(tuple(refined[: keep + 1]), tuple(infeasible), candidates, evaluated, feasible)


def _fit_key(lay: Layout) -> tuple:
    return (lay.tp, lay.pp, lay.micro_batch, lay.schedule, lay.virtual_stages, lay.sequence_parallel, lay.zero, lay.recompute)


def _dominated(lay: Layout, fitted: set[tuple]) -> bool:
    """A layout slower than one that already fits: recomputation only adds work, so when ``none``
    fits, ``selective`` and ``full`` (otherwise identical) are slower (Korthikanti et al. 2022, Sec. 5).

    (ZeRO stages do not dominate each other: ZeRO-1/2 move the same bytes as plain data
    parallelism but shard the optimizer update, ZeRO-3 adds all-gathers; all are costed.)
    """
    base = (lay.tp, lay.pp, lay.micro_batch, lay.schedule, lay.virtual_stages, lay.sequence_parallel)
    return lay.recompute != "none" and (*base, lay.zero, "none") in fitted


def _pipeline_lower_bound(lay: Layout, total: float) -> float:
    """Seconds the pipeline of ``lay`` cannot beat, given ``total``: one micro-batch's work over all units.

    With ``T`` one micro-batch's work over all units split into ``p`` stages, the makespan
    ``Σ_k t_k + (m − 1)·max_k t_k ≥ T + (m − 1)·T/p`` (GPipe / 1F1B), and ``(m + (p − 1)/v)·T/p``
    interleaved (Narayanan et al. 2021, Sec. 2.2); without a pipeline, ``m·T``.
    """
    m, p = lay.num_microbatches, lay.pp
    if lay.schedule == "interleaved":
        return (m + (p - 1) / lay.virtual_stages) * total / p
    return total + (m - 1) * total / p


class _neg:
    """Reverses a layout's order inside the max-heap so ties keep the smallest layout."""

    __slots__ = ("lay",)

    def __init__(self, lay: Layout) -> None:
        self.lay = lay

    def __lt__(self, other: "_neg") -> bool:
        return self.lay > other.lay

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _neg) and self.lay == other.lay


def _keep_closest(kept: list[Evaluation], ev: Evaluation) -> list[Evaluation]:
    out = sorted([*kept, ev], key=lambda e: (e.peak_memory, e.step_time, e.layout))
    return out[:MAX_INFEASIBLE_KEPT]


def refine(ev: Evaluation, model: ModelCosts, ctx: Context) -> Evaluation:
    """Re-time the pipeline by event simulation (non-uniform stages, transfers)."""
    lay = ev.layout
    if lay.pp == 1 or 2 * lay.pp * lay.num_microbatches * lay.virtual_stages > REFINE_MAX_ACTIONS:
        return ev
    timeline = simulate_evaluation(ev)
    pipe = timeline.makespan + pipeline_waits(ctx, lay)
    busiest = max(s.fwd + s.bwd for s in ev.stages)
    bubble = max(0.0, (pipe - lay.num_microbatches * busiest) / pipe)
    return replace(ev, step_time=pipe + ev.dp_exposed_s + ev.optimizer_s, pipeline_s=pipe, bubble_fraction=bubble)


def simulate_evaluation(ev: Evaluation):  # noqa: ANN201 - returns schedule.Timeline
    lay = ev.layout
    v = lay.virtual_stages
    sched = compiled(lay.schedule, lay.pp, lay.num_microbatches, v)  # type: ignore[arg-type]
    # Each chunk's own time (interleaved stages are uneven: the first holds the embedding, the last the head).
    fwd = [list(s.chunk_fwd) if len(s.chunk_fwd) == v else [s.fwd / v] * v for s in ev.stages]
    bwd = [list(s.chunk_bwd) if len(s.chunk_bwd) == v else [s.bwd / v] * v for s in ev.stages]
    return simulate(sched, fwd, bwd, ev.p2p_s)
