"""Why a layout lost, and what would make an infeasible spec fit: sentences for the report."""

from __future__ import annotations

from trainplan.ir.units import format_bytes
from trainplan.planner.evaluate import Evaluation


def _pct(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:.0f}%"


def memory_reason(ev: Evaluation, limit: float) -> str:
    """``does not fit: needs 93.1 GiB of 80.0 GiB (activations 61.0 GiB)``."""
    mem = ev.stages[ev.peak_stage].memory
    parts = {
        "activations": mem.activations + mem.transient,
        "optimizer state": mem.optimizer,
        "parameters": mem.params,
        "gradients": mem.grads,
    }
    name, size = max(parts.items(), key=lambda kv: (kv[1], kv[0]))
    return f"does not fit: needs {format_bytes(ev.peak_memory)} of {format_bytes(limit)} ({name} {format_bytes(size)})"


def _compute_s(ev: Evaluation) -> float:
    """Seconds of the step the busiest pipeline rank spends computing (its TP communication excluded)."""
    return ev.pipeline_s * (1.0 - ev.bubble_fraction) - ev.tp_s


def _compute_cause(ev: Evaluation, best: Evaluation) -> str:
    a, b = ev.layout, best.layout
    if a.recompute != b.recompute:
        return f"recompute {a.recompute} vs {b.recompute} costs more compute"
    if a.sequence_parallel != b.sequence_parallel:
        on = "with" if a.sequence_parallel else "without"
        return f"{on} sequence parallelism: norms and dropout stream more activation bytes"
    if a.micro_batch < b.micro_batch:
        return f"micro-batch {a.micro_batch} vs {b.micro_batch}: smaller GEMMs and more kernel launches"
    if a.tp > b.tp:
        return f"tp={a.tp} vs {b.tp}: thinner GEMM shards"
    if a.pp != b.pp or a.schedule != b.schedule:
        return "less balanced pipeline stages"
    return "more compute per step on the busiest rank"


def slower_reason(ev: Evaluation, best: Evaluation) -> str:
    """``12% slower: <the component of the step that grew most>``."""
    if ev.step_time <= best.step_time:
        return "as fast: same estimated step time, ranked after it by layout order"
    head = f"{(ev.step_time / best.step_time - 1) * 100:.1f}% slower"
    dp_text = "DP all-reduce crosses nodes" if ev.dp_crosses_nodes and not best.dp_crosses_nodes else "exposed DP gradient sync"
    causes = [
        (ev.bubble_fraction * ev.pipeline_s - best.bubble_fraction * best.pipeline_s,
         f"pipeline bubble {ev.bubble_fraction * 100:.1f}% vs {best.bubble_fraction * 100:.1f}%"),
        (ev.dp_exposed_s - best.dp_exposed_s, f"{dp_text} ({ev.dp_exposed_s:.3g} s vs {best.dp_exposed_s:.3g} s)"),
        (ev.tp_s - best.tp_s, f"tensor-parallel communication {ev.tp_s:.3g} s vs {best.tp_s:.3g} s"),
        (ev.pp_s - best.pp_s, f"pipeline transfers {ev.pp_s:.3g} s vs {best.pp_s:.3g} s"),
        (ev.optimizer_s - best.optimizer_s, f"optimizer update {ev.optimizer_s:.3g} s vs {best.optimizer_s:.3g} s"),
        (_compute_s(ev) - _compute_s(best), _compute_cause(ev, best)),
    ]
    gain, text = max(causes, key=lambda c: (c[0], c[1]))
    return f"{head}: {text}" if gain > 0 else head


def what_would_fit(ev: Evaluation, limit: float, world: int) -> str:
    """Advice for the closest infeasible candidates."""
    lay, mem = ev.layout, ev.stages[ev.peak_stage].memory
    tips = []
    ratio = ev.peak_memory / limit
    tips.append(f"~{ratio:.1f}x the devices ({int(world * ratio + 0.999)})")
    if lay.zero < 3 and (mem.optimizer + mem.grads + mem.params) > 0.3 * ev.peak_memory:
        tips.append("ZeRO-3 (parallel.zero: 3)")
    if lay.recompute != "full" and (mem.activations + mem.transient) > 0.3 * ev.peak_memory:
        tips.append("full recompute (parallel.recompute: full)")
    if lay.micro_batch > 1:
        tips.append("a smaller micro-batch (parallel.micro_batch)")
    return f"{lay.describe()}: {memory_reason(ev, limit)}; would fit with " + " or ".join(tips)
