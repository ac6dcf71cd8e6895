"""The operator side of ``trainplan calibrate``: the per-operator table from the workers' timings
and the share of its speed a worker keeps when all of them train (:mod:`trainplan.runtime.op_bench`
and :mod:`trainplan.runtime.calibrate_framework` measure; this module aggregates), and the
tensor-parallel overheads gathered from the ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from trainplan.runtime.op_bench import OpTiming, apply_in_situ, fit_op_costs

if TYPE_CHECKING:
    from trainplan.runtime.calibrate import Measurement


def measured_share(lockstep: float | None, cores: int, nproc: int, threads: int, backend: str) -> float:
    """``device.compute_share``: the lockstep measurement (:func:`calibrate_framework.lockstep_pace`),
    never above ``cores / (processes · threads)``; 1 on GPUs. Even where every worker has its cores,
    the workers of one machine share its memory bandwidth and caches, and gloo's threads take CPU
    time from them: the measurement keeps that too."""
    if backend != "gloo":
        return 1.0
    bound = compute_share(cores, nproc, threads)
    return bound if lockstep is None else min(bound, lockstep)


def collective_wait(lockstep: Sequence[float] | None, backend: str) -> float:
    """``device.collective_wait_s``: the lockstep probe's wait per collective
    (:func:`calibrate_framework.lockstep_pace`) on gloo; 0 on other backends or where the probe did
    not run (one process, or an older probe's two-figure result)."""
    if backend != "gloo" or not lockstep or len(lockstep) < 3:
        return 0.0
    return max(0.0, float(lockstep[2]))


def compute_share(cores: int, nproc: int, threads: int) -> float:
    """The fraction of its own speed a CPU worker keeps while all ``nproc`` compute at once:
    ``cores / (nproc · threads)`` when they outnumber the cores (the scheduler time-slices them),
    else 1."""
    return min(1.0, cores / max(1, nproc * threads))


def slowest_op_timings(per_rank: Sequence[dict[str, list[list[Any]]]]) -> dict[str, tuple[OpTiming, ...]]:
    """Per dtype, each probe's forward and backward at the slowest rank (ranks run the same probes in
    the same order, as with the matrix products: the pace of a synchronous step is its slowest rank)."""
    out = {}
    for dtype in per_rank[0] if per_rank else {}:
        rows = zip(*(r[dtype] for r in per_rank))
        out[dtype] = tuple(OpTiming(str(same[0][0]), float(same[0][1]), max(float(x[2]) for x in same),
                                    max(float(x[3]) for x in same)) for same in rows)
    return out


def op_table(m: Measurement, dtype: str) -> dict[str, dict[str, float]]:
    """The per-operator table of ``dtype``: the fits of the probes (:func:`fit_op_costs`), their fixed
    costs scaled by the in-situ factors measured on a generic network (:func:`apply_in_situ`), and
    ``recompute:full`` / ``recompute:selective``: the checkpointing machinery's forward and backward
    seconds per tensor a recomputed block saves for backward (:func:`calibrate_framework.recompute_overhead`),
    as fixed costs."""
    table = apply_in_situ(fit_op_costs(list(m.ops[dtype])), m.in_situ.get(dtype, {}))
    for mode, (fwd, bwd) in sorted(m.recompute.get(dtype, {}).items()):
        table[f"recompute:{mode}"] = {"per": "element", "fwd_fixed_s": fwd, "fwd_per_unit_s": 0.0,
                                      "bwd_fixed_s": bwd, "bwd_per_unit_s": 0.0}
    return table


def slowest_tp_overhead(per_rank: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """:func:`calibrate_framework.tp_overhead` of every rank combined figure by figure at the slowest
    rank (a synchronous step waits for it); ``None`` when no rank measured it."""
    rows = [r for r in per_rank if r]
    if not rows:
        return None
    return {
        "module": [max(r["module"][i] for r in rows) for i in (0, 1)],
        "loss": [max(r["loss"][i] for r in rows) for i in (0, 1)],
        "param_step": {name: max(r["param_step"][name] for r in rows) for name in rows[0]["param_step"]},
    }


def tp_overhead_fields(overhead: dict[str, Any], share: float) -> dict[str, Any]:
    """``device.tp_overhead`` of a measurement taken with every worker at once: at one device's full
    speed (× ``share``), as the planner divides it by ``compute_share`` like the operator table."""
    from trainplan.runtime.calibrate_links import round_significant

    def full_speed(seconds: float) -> float:
        return round_significant(seconds * share)

    return {"module_fwd_s": full_speed(overhead["module"][0]), "module_bwd_s": full_speed(overhead["module"][1]),
            "loss_fwd_s": full_speed(overhead["loss"][0]), "loss_bwd_s": full_speed(overhead["loss"][1]),
            "param_step_s": {name: full_speed(s) for name, s in sorted(overhead["param_step"].items())}}
