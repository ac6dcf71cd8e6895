"""``trainplan inspect``: the traced model's units, repeated blocks and totals, with closed-form checks."""

from __future__ import annotations

import json
from typing import Any

from trainplan.ir.facts import TransformerFacts
from trainplan.ir.graph import OpGraph
from trainplan.ir.spec import Spec
from trainplan.ir.units import format_bytes, format_count
from trainplan.planner.table import format_table

HEADERS = ["unit", "x", "params", "fwd FLOPs", "bwd FLOPs", "activations", "cut bytes"]


def megatron_eq2_params(f: TransformerFacts) -> float:
    """Narayanan et al. 2021, Eq. 2: ``12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h))``, plus ``2h`` for the
    final LayerNorm (which Eq. 2 leaves out) — a GPT with learned positions, tied embeddings and a 4h MLP."""
    l, h, v, s = f.layers, f.hidden, f.vocab, f.seq_len
    return 12 * l * h * h * (1 + 13 / (12 * h) + (v + s) / (12 * l * h)) + 2 * h


def palm_flops_per_token(params: float, f: TransformerFacts) -> float:
    """Chowdhery et al. 2022 (PaLM), Appendix B: ``6N + 12·L·H·Q·T`` training FLOPs per token
    (``H·Q`` = hidden size, ``T`` = sequence length)."""
    return 6 * params + 12 * f.layers * f.hidden * f.seq_len


def _eq2_applies(f: TransformerFacts) -> bool:
    return f.kind == "decoder" and f.learned_positions and f.tied_embeddings and not f.gated_mlp and f.ffn_hidden == 4 * f.hidden


def rows(graph: OpGraph) -> list[list[str]]:
    out = []
    for group in graph.block_groups():
        units = graph.units[group.first : group.first + group.count]
        u = units[0]
        out.append([
            group.label.rsplit(" ×", 1)[0], str(group.count), format_count(u.params), format_count(u.flops_fwd),
            format_count(u.flops_bwd), format_bytes(u.activation_bytes), format_bytes(units[-1].output_bytes),
        ])
    return out


def checks(graph: OpGraph, tokens: int, lm: bool = True) -> list[dict[str, Any]]:
    """Totals against closed forms, where the model's architecture makes them apply.

    PaLM's FLOPs per token (Chowdhery et al. 2022, App. B) is a language model's: every parameter,
    the output layer included, is used once per token; a classifier (ViT) has none per token.
    """
    f = graph.facts
    if f is None:
        return []
    out = []
    if _eq2_applies(f):
        expected = megatron_eq2_params(f)
        out.append({"check": "parameters = Megatron-LM Eq. 2 + final LayerNorm", "measured": graph.params,
                    "closed_form": expected, "relative_error": graph.params / expected - 1})
    if not lm:
        return out
    per_token = graph.flops / tokens
    expected = palm_flops_per_token(graph.params, f)
    out.append({"check": "training FLOPs per token = PaLM 6N + 12·L·h·s", "measured": per_token,
                "closed_form": expected, "relative_error": per_token / expected - 1})
    return out


def _tokens(spec: Spec) -> int:
    return spec.task.seq_len if spec.task.kind == "lm" and spec.task.seq_len else 1


def inspect_text(spec: Spec, graph: OpGraph) -> str:
    lines = [
        f"{spec.name}: traced with {graph.frontend} on meta tensors; costs per sample "
        f"({_tokens(spec)} tokens), activations in {graph.dtype}",
        "",
        format_table(HEADERS, rows(graph), [False, True, True, True, True, True, True]),
        "",
        f"total: {format_count(graph.params)} parameters ({format_bytes(graph.param_bytes)}), "
        f"{format_count(graph.flops_fwd)} forward + {format_count(graph.flops_bwd)} backward FLOPs per sample, "
        f"{format_bytes(graph.activation_bytes)} saved for backward per sample",
    ]
    for c in checks(graph, _tokens(spec), spec.task.kind == "lm"):
        lines.append(f"check: {c['check']}: {format_count(c['measured'])} vs {format_count(c['closed_form'])} "
                     f"({c['relative_error'] * 100:+.3f}%)")
    return "\n".join(lines)


def inspect_json(spec: Spec, graph: OpGraph) -> str:
    units = [
        {"name": u.name, "kind": u.kind, "block_type": u.block_type, "modules": list(u.modules), "params": u.params,
         "flops_fwd": u.flops_fwd, "flops_bwd": u.flops_bwd, "activation_bytes": u.activation_bytes,
         "output_bytes": u.output_bytes}
        for u in graph.units
    ]
    groups = [{"label": g.label, "first": g.first, "count": g.count, "block_type": g.block_type} for g in graph.block_groups()]
    body = {
        "name": spec.name, "frontend": graph.frontend, "dtype": graph.dtype, "per_sample_tokens": _tokens(spec),
        "totals": {"params": graph.params, "param_bytes": graph.param_bytes, "flops_fwd": graph.flops_fwd,
                   "flops_bwd": graph.flops_bwd, "activation_bytes": graph.activation_bytes},
        "groups": groups, "units": units, "checks": checks(graph, _tokens(spec), spec.task.kind == "lm"),
    }
    return json.dumps(body, indent=2)
