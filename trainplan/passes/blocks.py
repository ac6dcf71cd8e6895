"""Pass 4, blocks: give every unit a block type, shared by units that compute the same thing.

A unit's type is a digest of its nodes read relative to the unit (operator, target, module path
below the unit's module, shapes, dtypes, FLOPs, bytes saved, parameters owned, and which inputs
come from inside the unit), so the 96 layers of GPT-3 share one type and ``block_groups()``
shows them as ``layers.0-95 ×96``. Where the node pattern repeats, the cost does too: the
verifier checks that units of one type have equal costs. (Capture already traced each
structurally identical block once; this pass names the repetition the graph actually shows.)
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from trainplan.ir.graph import OpGraph, OpNode, Unit


def detect_blocks(graph: OpGraph) -> OpGraph:
    """The graph with every unit's ``block_type`` set (``<Class>:<digest>``)."""
    classes = dict(graph.module_classes)
    return graph.replace(units=tuple(replace(u, block_type=_block_type(graph, u, classes)) for u in graph.units))


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def _node_signature(node: OpNode, unit: Unit, local: dict[str, str], index: int) -> str:
    prefix = unit.modules[0] + "." if unit.modules else ""
    module = unit.modules[0] if unit.modules else ""
    path = "" if node.module_path == module else _relative(node.module_path, prefix)
    inputs = [local.get(i, "outside") for i in node.inputs]
    saved = sorted(b for _, b in node.saved)
    local[node.name] = str(index)
    return repr((node.op, node.target, path, node.shapes, node.dtypes, node.flops_fwd, node.flops_bwd,
                 node.params, node.param_bytes, saved, inputs))


def _block_type(graph: OpGraph, unit: Unit, classes: dict[str, str]) -> str:
    local: dict[str, str] = {}
    parts = [_node_signature(n, unit, local, i) for i, n in enumerate(graph.unit_nodes(unit))]
    parts.append(repr((unit.kind, unit.activation_bytes, unit.shared_param_bytes)))
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]
    label = classes.get(unit.modules[0], unit.kind) if unit.kind == "block" and unit.modules else unit.kind
    return f"{label}:{digest}"
