"""The HTML report: one self-contained page (inline CSS and SVG, no scripts, no network).

It shows the headline numbers, the pipeline timeline (a Gantt chart of the simulated schedule,
one row per pipeline rank), a memory bar per stage against the device limit, the mesh and rank
placement, and the alternatives the search rejected. A pure function of the plan.
"""

from __future__ import annotations

from html import escape

from trainplan.ir.plan import Plan
from trainplan.ir.units import format_bytes
from trainplan.planner.report import ALT_HEADERS, STAGE_HEADERS, alternative_rows, headline, stage_rows
from trainplan.planner.schedule import compiled, simulate

MAX_TIMELINE_OPS = 4000  # compute blocks drawn at most; larger schedules are drawn with fewer micro-batches
WIDTH = 960
ROW = 22
COLORS = {"F": "#4e79a7", "B": "#f28e2b"}
MEMORY_COLORS = (("params", "#4e79a7"), ("grads", "#59a14f"), ("optimizer", "#b07aa1"),
                 ("activations", "#f28e2b"), ("overhead", "#bab0ac"))

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1000px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}
th{background:#f3f3f3}h1{font-size:22px}h2{font-size:17px;margin-top:28px}.note{color:#555;font-size:13px}
"""


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>" if any(headers) else ""
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _shown_microbatches(plan: Plan) -> int:
    """Micro-batches to draw: all, unless the chart would exceed MAX_TIMELINE_OPS blocks."""
    p, v, m = plan.mesh.pp, plan.virtual_stages, plan.num_microbatches
    per_mb = 2 * p * v
    if m * per_mb <= MAX_TIMELINE_OPS:
        return m
    shown = max(1, MAX_TIMELINE_OPS // per_mb)
    if plan.schedule == "interleaved":
        shown = max(p, shown - shown % p)
    return min(m, shown)


def timeline_svg(plan: Plan) -> str:
    """Gantt chart of the plan's pipeline schedule, simulated with its stage times."""
    p, v = plan.mesh.pp, plan.virtual_stages
    m = _shown_microbatches(plan)
    fwd = [[plan.stages[c * p + r].fwd_time_s for c in range(v)] for r in range(p)]
    bwd = [[plan.stages[c * p + r].bwd_time_s for c in range(v)] for r in range(p)]
    p2p = plan.estimate.comm_time_s.pp / (2 * (p - 1)) if p > 1 else 0.0
    timeline = simulate(compiled(plan.schedule, p, m, v), fwd, bwd, p2p)
    scale = (WIDTH - 80) / timeline.makespan if timeline.makespan else 0.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{p * ROW + 30}" role="img">']
    for r in range(p):
        y = r * ROW + 4
        parts.append(f'<text x="0" y="{y + 14}" font-size="12">rank {r}</text>')
        for ev in timeline.events(r):
            x, w = 70 + ev.start * scale, max(0.5, (ev.end - ev.start) * scale)
            color = COLORS.get(ev.action.kind, "#999")
            label = f"{ev.action.kind}{ev.action.microbatch}" + (f" chunk {ev.action.chunk}" if v > 1 else "")
            parts.append(
                f'<rect class="op" x="{x:.2f}" y="{y}" width="{w:.2f}" height="{ROW - 6}" fill="{color}">'
                f"<title>{escape(label)}: {ev.start:.4g}-{ev.end:.4g} s</title></rect>"
            )
    parts.append(f'<text x="70" y="{p * ROW + 24}" font-size="12">0 s</text>')
    parts.append(f'<text x="{WIDTH - 10}" y="{p * ROW + 24}" font-size="12" text-anchor="end">{timeline.makespan:.4g} s</text>')
    parts.append("</svg>")
    caption = "forward (blue) and backward (orange) of each micro-batch on each pipeline rank"
    if m < plan.num_microbatches:
        caption += f"; simulated with {m} of the step's {plan.num_microbatches} micro-batches to keep this page small"
    return "".join(parts) + f'<p class="note">{escape(caption)}</p>'


def memory_svg(plan: Plan) -> str:
    """A stacked bar per pipeline rank (params, grads, optimizer, activations, overhead) against the
    device limit; with interleaving a rank holds several stages and the bar is its whole memory."""
    limit = plan.spec.cluster.device.memory
    ranks = plan.stages[: plan.mesh.pp]  # stage c·pp + r lives on pipeline rank r
    top = max([limit, *(s.memory_bytes for s in ranks)])
    scale = (WIDTH - 220) / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{len(ranks) * ROW + 40}">']
    for i, st in enumerate(ranks):
        y, x = i * ROW + 4, 80.0
        label = f"stage {st.index}" if plan.virtual_stages == 1 else f"rank {i}"
        parts.append(f'<text x="0" y="{y + 14}" font-size="12">{label}</text>')
        for name, color in MEMORY_COLORS:
            size = getattr(st.memory_breakdown, name)
            w = size * scale
            parts.append(f'<rect class="mem" x="{x:.2f}" y="{y}" width="{w:.2f}" height="{ROW - 6}" fill="{color}">'
                         f"<title>{name}: {format_bytes(size)}</title></rect>")
            x += w
        parts.append(f'<text x="{x + 6:.2f}" y="{y + 14}" font-size="12">{format_bytes(st.memory_bytes)}</text>')
    lx = 80 + limit * scale
    height = len(ranks) * ROW + 4
    parts.append(f'<line x1="{lx:.2f}" y1="0" x2="{lx:.2f}" y2="{height}" stroke="#d00" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{lx:.2f}" y="{height + 16}" font-size="12" fill="#d00" text-anchor="middle">'
                 f"device limit {format_bytes(limit)}</text></svg>")
    legend = ", ".join(f'<span style="color:{c}">&#9632;</span> {n}' for n, c in MEMORY_COLORS)
    return "".join(parts) + f'<p class="note">{legend}</p>'


def _ranks(ranks: list[int]) -> str:
    runs, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(runs)


def report_html(plan: Plan) -> str:
    mesh = plan.mesh
    placement = [[str(s.index), s.units[0] + (f" .. {s.units[-1]}" if len(s.units) > 1 else ""), _ranks(s.ranks)]
                 for s in plan.stages]
    sections = [
        f"<h1>Plan: {escape(plan.spec.name)}</h1>",
        _table(["", ""], [[k, v] for k, v in headline(plan)]),
        "<h2>Pipeline timeline</h2>", timeline_svg(plan),
        "<h2>Memory per device</h2>", memory_svg(plan),
        f"<h2>Mesh and placement</h2><p>mesh (pp, dp, tp) = ({mesh.pp}, {mesh.dp}, {mesh.tp}); "
        "tensor-parallel ranks are innermost, so a TP group stays inside a node.</p>",
        _table(["stage", "units", "ranks"], placement),
        "<h2>Stages</h2>", _table(STAGE_HEADERS, stage_rows(plan)),
    ]
    if plan.alternatives:
        sections += ["<h2>Alternatives</h2>", _table(ALT_HEADERS, alternative_rows(plan))]
    if plan.notes:
        sections += ["<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in plan.notes) + "</ul>"]
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>trainplan: {escape(plan.spec.name)}'
            f"</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
