"""Per unit of a traced graph, the operators it runs: what :mod:`trainplan.planner.cost.ops` costs.

The front end traces at batch 1 (:func:`trainplan.passes.capture.capture`), so a node's output
elements and FLOPs are per sample when the node depends on the batch. Two facts are derived by
propagation along the graph's edges, in execution order:

* **batch dependence**: a node depends on the batch when one of its inputs is a graph input or a
  batch-dependent node; the rest (rotary ``cos``/``sin`` tables, position ``arange``) do the same
  work whatever the micro-batch.
* **gradient path**: a node has a backward when it produces a floating-point tensor and reads a
  parameter or a node on the gradient path (autograd records exactly those, PyTorch "Autograd
  mechanics", requires_grad propagation); integer ops and work on inputs alone have none.

Under tensor parallelism a node's work divides by ``t`` when it produces or reads a value that the
Megatron split shards (``trainplan.planner.model_costs._tp_sharded_values``: column-parallel
outputs, the vocabulary-parallel head's logits, and everything computed from them until a
row-parallel layer), which covers the row-parallel products themselves.
"""

from __future__ import annotations

from math import prod

from trainplan.ir.graph import OpGraph, OpNode
from trainplan.planner.cost.ops import OpUse

# Operators whose cost grows with their FLOPs rather than their output (the flop counter's ops).
FLOP_OPS = frozenset({
    "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "conv1d", "conv2d", "conv3d",
    "convolution", "scaled_dot_product_attention", "outer",
})
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})
SKIPPED = frozenset({"placeholder", "output", "get_attr"})


def _elements(node: OpNode) -> float:
    return float(sum(prod(shape) for shape in node.shapes))


def _kind(name: str, node: OpNode, no_kernel: frozenset[str]) -> str:
    if name in no_kernel:
        return "view"
    if name in FLOP_OPS or (node.flops_fwd > 0 and name not in ("layer_norm", "rms_norm", "batch_norm")):
        return "flop"
    return "element"


# Containers that hold modules but are never called themselves.
CONTAINERS = frozenset({"ModuleList", "ModuleDict", "ParameterList", "ParameterDict"})


def module_calls(graph: OpGraph, nodes: tuple[OpNode, ...] | list[OpNode]) -> int:
    """Modules whose ``forward`` runs for ``nodes``: each node's module and its ancestors below the
    root (the root's own call is paid once per model, not per unit), containers excluded. Counted
    once per module; a module called twice in a unit (a shared dropout) counts once."""
    classes = dict(graph.module_classes)
    called: set[str] = set()
    for node in nodes:
        parts = node.module_path.split(".") if node.module_path else []
        called.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sum(1 for path in called if classes.get(path, "") not in CONTAINERS)


def unit_op_uses(graph: OpGraph, tp_sharded: set[str]) -> list[tuple[OpUse, ...]]:
    """Per unit of ``graph``, its operators aggregated by (name, kind, gradient path), in first-seen
    order, then ``module_call``: the unit's module invocations (:func:`module_calls`, a fixed
    forward cost each, measured by ``trainplan calibrate``)."""
    from trainplan.planner.model_costs import NO_KERNEL_OPS, _op_name

    batch: set[str] = set()
    grad: set[str] = set()
    out = []
    for unit in graph.units:
        agg: dict[tuple[str, str, bool], list[float]] = {}
        nodes = graph.unit_nodes(unit)
        for node in nodes:
            if node.op in SKIPPED:
                continue
            name = _op_name(node)
            if any(i.startswith("input:") or i in batch for i in node.inputs):
                batch.add(node.name)
            floating = any(d in FLOAT_DTYPES for d in node.dtypes)
            if floating and (node.param_names or any(i in grad for i in node.inputs)):
                grad.add(node.name)
            kind = _kind(name, node, NO_KERNEL_OPS)
            units = node.flops_fwd if kind == "flop" else _elements(node)
            sharded = node.name in tp_sharded or any(i in tp_sharded for i in node.inputs)
            key = f"{name}[{node.variant}]" if node.variant else name  # a kernel of its own (cost.ops.lookup)
            row = agg.setdefault((key, kind, node.name in grad), [0, 0.0, 0.0, 0.0])
            row[0] += 1
            if node.name not in batch:
                row[3] += units
            elif sharded:
                row[2] += units
            else:
                row[1] += units
        uses = [OpUse(n, k, g, int(r[0]), r[1], r[2], r[3]) for (n, k, g), r in agg.items()]
        calls = module_calls(graph, nodes)
        if calls:
            uses.append(OpUse("module_call", "view", False, calls, 0.0, 0.0, 0.0))
        out.append(tuple(uses))
    return out
