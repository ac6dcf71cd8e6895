"""Partition reports: terminal summary, JSON, Markdown. Pure functions of a Plan.

Every report is derived from the plan alone, so ``trainplan plan plan.yaml`` re-reports a saved
plan without searching and produces the same bytes. The one exception is ``search.elapsed_s`` in
the JSON report: the wall time of the search that produced it (``null`` when re-reported).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trainplan.errors import TrainplanError
from trainplan.ir.plan import Plan
from trainplan.ir.units import format_bytes, format_count
from trainplan.planner.table import format_table


def layout_line(plan: Plan) -> str:
    sched = plan.schedule + (f"(v={plan.virtual_stages})" if plan.schedule == "interleaved" else "")
    sp = " sp" if plan.sequence_parallel else ""
    servers = f" + {plan.ps_servers_dedicated} dedicated ps servers" if plan.ps_servers_dedicated else ""
    return (
        f"dp={plan.mesh.dp} tp={plan.mesh.tp} pp={plan.mesh.pp} mb={plan.micro_batch}x{plan.num_microbatches} "
        f"{sched} zero={plan.zero} recompute={plan.recompute}{sp}{servers}"
    )


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def _rate(flops_per_s: float) -> str:
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6)):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.1f} {unit}"
    return f"{flops_per_s:.0f} FLOP/s"


def _comm(plan: Plan) -> str:
    """The comm options that matter for the plan's choices, e.g. `` (topk_ratio=0.1)``; empty when none do."""
    used = {"topk_ratio": plan.compression == "topk", "powersgd_rank": plan.compression == "powersgd",
            "local_size": plan.allreduce == "hierarchical", "ps_servers": plan.allreduce == "ps",
            "staleness": plan.sync == "async", "local_sgd_period": plan.sync == "local_sgd",
            "local_sgd_warmup": plan.sync == "local_sgd", "ps_placement": plan.ps_servers_dedicated > 0}
    shown = [f"{k}={getattr(plan.comm, k)}" for k, on in used.items() if on and getattr(plan.comm, k) is not None]
    return f" ({', '.join(shown)})" if shown else ""


def headline(plan: Plan) -> list[tuple[str, str]]:
    """(label, value) pairs shared by the text and Markdown reports."""
    est, cluster = plan.estimate, plan.spec.cluster
    mem = est.memory_breakdown
    rows = [
        ("model", f"{plan.spec.name}: {format_count(plan.model.params)} parameters"),
        ("cluster", f"{cluster.nodes} x {cluster.devices_per_node} {cluster.device.name} ({cluster.world_size} devices)"),
        ("layout", layout_line(plan)),
        ("collectives", f"allreduce={plan.allreduce} sync={plan.sync} compression={plan.compression}{_comm(plan)}"),
        ("step time", _duration(est.step_time_s)),
        ("throughput", f"{est.samples_per_s:,.1f} samples/s, {est.tokens_per_s:,.0f} tokens/s"),
        ("per device", f"{_rate(est.tflops_per_device * 1e12)}, MFU {est.mfu * 100:.1f}%"),
        (
            "memory/device",
            f"{format_bytes(est.memory_per_device_bytes)} of {format_bytes(cluster.device.memory)} "
            f"(params {format_bytes(mem.params)}, grads {format_bytes(mem.grads)}, "
            f"optimizer {format_bytes(mem.optimizer)}, activations {format_bytes(mem.activations)}, "
            f"overhead {format_bytes(mem.overhead)})",
        ),
        (
            "comm/step",
            f"dp {_duration(est.comm_time_s.dp)}, tp {_duration(est.comm_time_s.tp)}, pp {_duration(est.comm_time_s.pp)}",
        ),
        ("bubble", f"{est.bubble_fraction * 100:.1f}%"),
    ]
    if est.time_to_train_s is not None:
        rows.append(("time to train", f"{_duration(est.time_to_train_s)} for {plan.spec.training.tokens:.3g} tokens"))
    if est.energy_kwh is not None:
        rows.append(("energy", f"{est.energy_kwh:,.0f} kWh"))
    if est.cost is not None:
        rows.append(("cost", f"{est.cost:,.0f}"))
    return rows


def stage_rows(plan: Plan) -> list[list[str]]:
    rows = []
    for st in plan.stages:
        first, last = st.units[0], st.units[-1]
        span = first if first == last else f"{first} .. {last}"
        rows.append(
            [
                str(st.index),
                span,
                str(len(st.units)),
                format_count(st.params),
                f"{(st.fwd_time_s + st.bwd_time_s) * 1e3:.2f}",
                format_bytes(st.memory_bytes),
            ]
        )
    return rows


STAGE_HEADERS = ["stage", "units", "n", "params", "f+b ms/mb", "memory"]
ALT_HEADERS = ["#", "layout", "step time", "memory", "why not chosen"]


def alternative_rows(plan: Plan) -> list[list[str]]:
    return [
        [
            str(a.rank),
            a.layout,
            _duration(a.step_time_s) if a.step_time_s is not None else "-",
            format_bytes(a.memory_per_device_bytes),
            a.reason,
        ]
        for a in plan.alternatives
    ]


def summary_text(plan: Plan) -> str:
    width = max(len(k) for k, _ in headline(plan))
    lines = [f"{k.ljust(width)}  {v}" for k, v in headline(plan)]
    lines += ["", format_table(STAGE_HEADERS, stage_rows(plan), [True, False, True, True, True, True])]
    if plan.alternatives:
        lines += ["", "alternatives:", format_table(ALT_HEADERS, alternative_rows(plan), [True, False, True, True, False])]
    if plan.notes:
        lines += ["", *[f"note: {n}" for n in plan.notes]]
    return "\n".join(lines)


def report_dict(plan: Plan, elapsed_s: float | None = None) -> dict[str, Any]:
    """The JSON report (see the issue's field list); ``elapsed_s`` is the search's wall time."""
    body = plan.model_dump(mode="json", by_alias=True, exclude={"spec", "estimate", "alternatives", "model", "search"})
    search = plan.search.model_dump(mode="json") if plan.search else {}
    return {
        "name": plan.spec.name,
        "spec_hash": plan.spec_hash,
        "plan": body,
        "estimate": plan.estimate.model_dump(mode="json"),
        "model": plan.model.model_dump(mode="json"),
        "search": {**search, "elapsed_s": elapsed_s},
        "alternatives": [a.model_dump(mode="json") for a in plan.alternatives],
    }


def report_json(plan: Plan, elapsed_s: float | None = None) -> str:
    return json.dumps(report_dict(plan, elapsed_s), indent=2) + "\n"


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return out + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def report_markdown(plan: Plan) -> str:
    lines = [f"# Plan: {plan.spec.name}", "", f"spec hash `{plan.spec_hash[:16]}`", ""]
    lines += _md_table(["", ""], [[f"**{k}**", v] for k, v in headline(plan)])
    lines += ["", "## Stages", "", *_md_table(STAGE_HEADERS, stage_rows(plan))]
    if plan.alternatives:
        lines += ["", "## Alternatives", "", *_md_table(ALT_HEADERS, alternative_rows(plan))]
    if plan.notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in plan.notes]]
    return "\n".join(lines) + "\n"


def write_reports(plan: Plan, out_dir: Path, elapsed_s: float | None) -> list[Path]:
    """Write plan.yaml and report.{json,md,html} into ``out_dir``, each atomically."""
    from trainplan.ir.loading import dump_yaml
    from trainplan.planner.report_html import report_html

    contents = {
        "plan.yaml": dump_yaml(plan),
        "report.json": report_json(plan, elapsed_s),
        "report.md": report_markdown(plan),
        "report.html": report_html(plan),
    }
    paths = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in contents.items():
            path = out_dir / name
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
            paths.append(path)
    except OSError as exc:
        raise TrainplanError(f"cannot write the reports to {out_dir}: {exc.strerror or exc}; choose another -o folder") from None
    return paths


def report_html(plan: Plan) -> str:
    from trainplan.planner.report_html import report_html as render

    return render(plan)
