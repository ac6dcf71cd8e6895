"""The auto-planner: cost model, search and reports. Imports ``ir``, never ``runtime``."""

from __future__ import annotations

import time
from collections.abc import Callable

from trainplan.errors import PlanningError
from trainplan.ir.graph import OpGraph
from trainplan.ir.plan import Plan
from trainplan.ir.spec import Spec


def context_for(spec: Spec):  # noqa: ANN201 - evaluate.Context (imported lazily to keep this module light)
    from trainplan.planner.evaluate import Context

    task = spec.task
    tokens = task.seq_len if task.kind == "lm" and task.seq_len else 1
    return Context(
        cluster=spec.cluster,
        precision=spec.training.precision,
        optimizer=spec.training.optimizer,
        global_batch=spec.training.global_batch,
        tokens_per_sample=tokens,
        allreduce=spec.parallel.allreduce,
        compression=spec.parallel.compression,
        sync=spec.parallel.sync,
        comm=spec.parallel.comm,
    )


def plan_from_graph(
    spec: Spec, graph: OpGraph, keep: int = 10, progress: Callable[[int, int], None] | None = None
) -> tuple[Plan, float]:
    """Search the spec's layouts for ``graph``; returns the plan and the search's wall time (s).

    Raises :class:`PlanningError` naming the closest candidates and what would make them fit when
    nothing fits, and when the fixed fields of the spec admit no layout at all.
    """
    from trainplan.planner.build_plan import build_plan
    from trainplan.planner.explain import what_would_fit
    from trainplan.planner.model_costs import model_costs_from_graph
    from trainplan.planner.search import search

    start = time.perf_counter()
    check_dedicated_servers(spec)
    model = model_costs_from_graph(graph, spec.model.hf.arch if spec.model.hf is not None else None)
    ctx = context_for(spec)
    result = search(model, spec.parallel, ctx, keep, progress=progress)
    if not result.ranked:
        raise PlanningError(_no_plan_message(spec, result, what_would_fit) + _model_limits(spec, model))
    plan = build_plan(spec, model, result, ctx, keep)
    return plan, time.perf_counter() - start


def check_dedicated_servers(spec: Spec) -> None:
    """Dedicated parameter servers are ranks of their own: they need ``allreduce: ps`` fixed (the
    search never picks it), and the cluster must keep at least one device for the workers."""
    par, world = spec.parallel, spec.cluster.world_size
    if par.comm.ps_placement != "dedicated":
        return
    if par.allreduce != "ps":
        raise PlanningError(
            f"parallel.comm.ps_placement: dedicated puts parameter servers on ranks of their own, but parallel.allreduce "
            f"is {par.allreduce!r}; set allreduce: ps, or drop ps_placement (the default, colocated)"
        )
    servers = par.dedicated_ps_servers()
    if servers >= world:
        raise PlanningError(
            f"parallel.comm.ps_servers = {servers} dedicated parameter servers leave none of the cluster's {world} "
            f"devices for workers; use fewer servers or more devices"
        )


def _model_limits(spec: Spec, model) -> str:  # noqa: ANN001
    """Why this model restricts a fixed tp or pp (no tensor-parallel rule, too few pipeline units)."""
    notes = []
    tp, pp = spec.parallel.tp, spec.parallel.pp
    if isinstance(tp, int) and tp > 1 and (model.facts is None or not model.facts.tensor_parallel):
        why = "it declares no transformer layers" if model.facts is None else "its layers have no Megatron-style split"
        notes.append(f"this model has no tensor-parallel rule ({why}), so tp stays 1")
    if isinstance(pp, int) and pp > len(model.units):
        names = ", ".join(u.name for u in model.units)
        notes.append(f"this model has {len(model.units)} pipeline unit(s) ({names}), fewer than pp = {pp}")
    return "".join(f"; {n}" for n in notes)


def _no_plan_message(spec: Spec, result, advise) -> str:  # noqa: ANN001
    fixed = spec.parallel.fixed()
    servers = spec.parallel.dedicated_ps_servers()
    world = spec.cluster.world_size - servers
    if result.candidates == 0:
        held = f" (the cluster has {world + servers}, {servers} of them dedicated parameter servers)" if servers else ""
        return (
            f"no layout of {world} devices{held} satisfies the fixed parallel fields {fixed or '{}'} with "
            f"training.global_batch {spec.training.global_batch}: dp x tp x pp must equal {world}, dp must divide "
            "the global batch, tp must divide the heads and the MLP width; relax a fixed field or change the cluster"
        )
    limit = float(spec.cluster.device.memory)
    lines = [f"no layout fits in {spec.cluster.device.name} memory ({result.evaluated} costed); the closest:"]
    lines += [f"  {advise(ev, limit, world)}" for ev in result.infeasible[:3]]
    return "\n".join(lines)
