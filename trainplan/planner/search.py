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
from dataclasses import dataclass, replace

from trainplan.ir.spec import ParallelSpec
from trainplan.planner import cost
from trainplan.planner.evaluate import Context, Evaluation, UnitTimes, evaluate, unit_times
from trainplan.planner.model_costs import ModelCosts
from trainplan.planner.schedule import compiled, simulate
from trainplan.planner.space import Layout, layouts

REFINE_TOP = 16  # candidates re-timed by event simulation
MAX_INFEASIBLE_KEPT = 5


@dataclass(frozen=True, slots=True)
class SearchResult:
    ranked: tuple[Evaluation, ...]  # feasible, fastest first (the winner is ranked[0])
    infeasible: tuple[Evaluation, ...]  # closest to fitting first
    candidates: int
    evaluated: int
    feasible: int


def _lower_bound(model: ModelCosts, lay: Layout, ctx: Context) -> float:
    """Seconds a step of ``lay`` cannot beat.

    The model FLOPs of a step spread evenly over every device at the best efficiency, stretched by
    the pipeline's fill and drain: a makespan of ``Σ_k t_k + (m − 1)·max_k t_k ≥ (m + p − 1)·t̄``
    for GPipe / 1F1B and ``(m + (p − 1)/v)·t̄`` interleaved (Narayanan et al. 2021, Sec. 2.2).
    """
    flops = model.flops_per_sample * ctx.global_batch
    peak = ctx.cluster.device.peak(ctx.dtype) * ctx.cluster.device.efficiency
    m, p, v = lay.num_microbatches, lay.pp, lay.virtual_stages
    fill = (m + (p - 1) / (v if lay.schedule == "interleaved" else 1)) / m
    return flops / (peak * ctx.cluster.world_size) * fill


def _state_lower_bound(model: ModelCosts, lay: Layout, ctx: Context) -> float:
    """Bytes of model states a device holds at least: parameters spread evenly over tp·pp."""
    per_device = model.params / (lay.tp * lay.pp)
    return cost.model_state_bytes(per_device, lay.zero, lay.dp, ctx.precision, ctx.optimizer).total  # type: ignore[arg-type]


def _key(e: Evaluation) -> tuple[float, Layout]:
    return (e.step_time, e.layout)


def search(
    model: ModelCosts, parallel: ParallelSpec, ctx: Context, keep: int = 10, refine_top: int = REFINE_TOP
) -> SearchResult:
    """The ``keep + 1`` fastest layouts that fit (winner first) and the closest that do not.

    ``refine_top`` best estimates are re-timed by event simulation before the final ranking.
    """
    units, blocks = len(model.units), model.blocks
    world, limit = ctx.cluster.world_size, float(ctx.cluster.device.memory)
    best: list[tuple[float, Layout, Evaluation]] = []  # max-heap by negated time, size <= keep + REFINE_TOP
    infeasible: list[Evaluation] = []
    candidates = evaluated = feasible = 0
    width = keep + refine_top
    unit_cache: dict[tuple, UnitTimes] = {}
    for lay in layouts(parallel, world, ctx.global_batch, units, blocks, model.facts):
        candidates += 1
        if _state_lower_bound(model, lay, ctx) > limit and len(infeasible) >= MAX_INFEASIBLE_KEPT:
            continue
        if len(best) >= width and _lower_bound(model, lay, ctx) >= -best[0][0]:
            continue
        times_key = (lay.tp, lay.micro_batch, lay.recompute, lay.sequence_parallel)
        if times_key not in unit_cache:
            unit_cache[times_key] = unit_times(model, lay, ctx)
        ev = evaluate(model, lay, ctx, unit_cache[times_key])
        evaluated += 1
        if not ev.fits:
            infeasible = _keep_closest(infeasible, ev)
            continue
        feasible += 1
        item = (-ev.step_time, _neg(lay), ev)
        if len(best) < width:
            heapq.heappush(best, item)
        elif item > best[0]:
            heapq.heapreplace(best, item)
    ranked = sorted((ev for _, _, ev in best), key=_key)
    refined = sorted((refine(ev, model, ctx) for ev in ranked[:refine_top]), key=_key) + ranked[refine_top:]
    return SearchResult(tuple(refined[: keep + 1]), tuple(infeasible), candidates, evaluated, feasible)


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
    if lay.pp == 1:
        return ev
    timeline = simulate_evaluation(ev)
    pipe = timeline.makespan
    busiest = max(s.fwd + s.bwd for s in ev.stages)
    bubble = max(0.0, (pipe - lay.num_microbatches * busiest) / pipe)
    return replace(ev, step_time=pipe + ev.dp_exposed_s, pipeline_s=pipe, bubble_fraction=bubble)


def simulate_evaluation(ev: Evaluation):  # noqa: ANN201 - returns schedule.Timeline
    lay = ev.layout
    v = lay.virtual_stages
    sched = compiled(lay.schedule, lay.pp, lay.num_microbatches, v)  # type: ignore[arg-type]
    fwd = [[s.fwd / v] * v for s in ev.stages]
    bwd = [[s.bwd / v] * v for s in ev.stages]
    return simulate(sched, fwd, bwd, ev.p2p_s)
