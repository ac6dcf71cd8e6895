"""Invariants of an OpGraph, as a table of declarative checks; tests run it after every pass.

Each check returns the problems it finds (empty when the invariant holds). Unit checks apply
once the graph is linearised; block-type checks once units are typed.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

from trainplan.ir.graph import OpGraph, saved_keys_before, unit_activation_bytes

Check = Callable[[OpGraph], list[str]]
_TOLERANCE = 1e-9  # relative, for float sums taken in a different order


class GraphInvariantError(RuntimeError):
    """A pass produced a graph that breaks an IR invariant (a bug in trainplan, not in the input)."""


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _TOLERANCE * max(abs(a), abs(b), 1.0)


def _unique_names(g: OpGraph) -> list[str]:
    seen: set[str] = set()
    duplicates = []
    for name in [v.name for v in g.inputs] + [n.name for n in g.nodes]:
        if name in seen:
            duplicates.append(f"duplicate name {name!r}")
        seen.add(name)
    return duplicates[:5]


def _edges_point_back(g: OpGraph) -> list[str]:
    known = {v.name for v in g.inputs}
    problems = []
    for n in g.nodes:
        problems += [f"{n.name} reads {i!r}, not an earlier node or input" for i in n.inputs if i not in known]
        known.add(n.name)
    problems += [f"output {o!r} is not a node or input" for o in g.outputs if o not in known]
    return problems[:5]


def _non_negative(g: OpGraph) -> list[str]:
    fields = ("flops_fwd", "flops_bwd", "params", "param_bytes", "activation_bytes", "output_bytes")
    return [f"{n.name}.{f} < 0" for n in g.nodes for f in fields if getattr(n, f) < 0][:5]


def _node_fields(g: OpGraph) -> list[str]:
    problems = [f"{n.name}: activation_bytes != sum of saved" for n in g.nodes
                if n.activation_bytes != sum(b for _, b in n.saved)]
    problems += [f"{n.name}: {len(n.shapes)} shapes, {len(n.dtypes)} dtypes" for n in g.nodes
                 if len(n.shapes) != len(n.dtypes)]
    return problems[:5]


def _params_owned_once(g: OpGraph) -> list[str]:
    first_read = list(dict.fromkeys(p for n in g.nodes for p in n.param_names))
    problems = []
    if first_read != [p.name for p in g.parameters]:
        problems.append("graph.parameters is not the parameters in order of first read")
    if sum(n.params for n in g.nodes) != sum(p.numel for p in g.parameters):
        problems.append("node-owned parameter elements != elements of graph.parameters")
    return problems


def _totals_over_nodes(g: OpGraph) -> list[str]:
    problems = [f"graph.{f} != sum over nodes" for f in ("params", "param_bytes")
                if getattr(g, f) != sum(getattr(n, f) for n in g.nodes)]
    problems += [f"graph.{f} != sum over nodes" for f in ("flops_fwd", "flops_bwd")
                 if not _close(getattr(g, f), sum(getattr(n, f) for n in g.nodes))]
    return problems


def _units_tile_nodes(g: OpGraph) -> list[str]:
    if not g.units:
        return []
    problems = []
    if g.units[0].first != 0 or g.units[-1].stop != len(g.nodes):
        problems.append("units do not start at node 0 and end at the last node")
    problems += [f"{a.name} ends at {a.stop}, {b.name} starts at {b.first}" for a, b in pairwise(g.units)
                 if a.stop != b.first]
    problems += [f"unit {u.name} is empty" for u in g.units if u.stop <= u.first]
    names = [u.name for u in g.units]
    problems += [f"duplicate unit name {n!r}" for n in sorted(set(names)) if names.count(n) > 1]
    return problems[:5]


def _unit_sums(g: OpGraph) -> list[str]:
    problems = []
    earlier = saved_keys_before(g.nodes, [(u.first, u.stop) for u in g.units])
    for i, u in enumerate(g.units):
        nodes = g.unit_nodes(u)
        for f in ("params", "param_bytes"):
            if getattr(u, f) != sum(getattr(n, f) for n in nodes):
                problems.append(f"{u.name}.{f} != sum over its nodes")
        for f in ("flops_fwd", "flops_bwd"):
            if not _close(getattr(u, f), sum(getattr(n, f) for n in nodes)):
                problems.append(f"{u.name}.{f} != sum over its nodes")
        if u.activation_bytes != unit_activation_bytes(nodes, earlier[i]):
            problems.append(f"{u.name}.activation_bytes != distinct saved bytes of its nodes, less earlier units'")
    if g.units:
        problems += [f"graph.{f} != sum over units" for f in ("params", "param_bytes")
                     if getattr(g, f) != sum(getattr(u, f) for u in g.units)]
        problems += [f"graph.{f} != sum over units" for f in ("flops_fwd", "flops_bwd")
                     if not _close(getattr(g, f), sum(getattr(u, f) for u in g.units))]
    return problems[:5]


def _unit_costs_non_negative(g: OpGraph) -> list[str]:
    fields = ("params", "param_bytes", "shared_param_bytes", "flops_fwd", "flops_bwd", "activation_bytes",
              "output_bytes", "tied_bytes_after")
    return [f"{u.name}.{f} < 0" for u in g.units for f in fields if getattr(u, f) < 0][:5]


def _blocks_in_their_units(g: OpGraph) -> list[str]:
    problems = []
    for u in g.units:
        for n in g.unit_nodes(u):
            if n.block and n.block not in u.modules:
                problems.append(f"{n.name} of block {n.block} lies in unit {u.name}")
        if u.kind == "block" and len(u.modules) != 1:
            problems.append(f"block unit {u.name} spans modules {u.modules}")
    return problems[:5]


def _last_cut_is_output(g: OpGraph) -> list[str]:
    if g.units and g.units[-1].output_bytes != g.output_bytes:
        return [f"last unit carries {g.units[-1].output_bytes} bytes, the outputs are {g.output_bytes}"]
    if g.units and g.units[-1].tied_bytes_after:
        return ["parameters are shared past the last unit"]
    return []


def _shared_params(g: OpGraph) -> list[str]:
    if not g.units:
        return []
    owner = {}
    for u in g.units:
        for n in g.unit_nodes(u):
            for p in n.param_names:
                owner.setdefault(p, u.name)
    problems = [f"{u.name} shares {p} but owns it" for u in g.units for p in u.shared_params if owner.get(p) == u.name]
    problems += [f"{u.name} lists {p} as tied but {owner.get(p)} owns it" for u in g.units for p in u.tied_params
                 if owner.get(p) != u.name]
    if len(g.tied) != len(g.tied_units):
        problems.append("tied and tied_units differ in length")
    for names, holders in zip(g.tied, g.tied_units):
        if holders and owner.get(names[0]) != holders[0]:
            problems.append(f"tied {names}: first holder {holders[0]} is not the owner {owner.get(names[0])}")
    return problems[:5]


def _equal_block_costs(g: OpGraph) -> list[str]:
    costs: dict[str, tuple] = {}
    problems = []
    for u in g.units:
        if not u.block_type:
            continue
        c = (u.flops_fwd, u.flops_bwd, u.params, u.param_bytes, u.activation_bytes, u.stop - u.first)
        if costs.setdefault(u.block_type, c) != c:
            problems.append(f"{u.name} has block type {u.block_type} but costs {c} != {costs[u.block_type]}")
    return problems[:5]


CHECKS: tuple[tuple[str, Check], ...] = (
    ("names are unique", _unique_names),
    ("edges point to earlier nodes or graph inputs", _edges_point_back),
    ("node costs are non-negative", _non_negative),
    ("node fields are consistent", _node_fields),
    ("each parameter is owned by its first reader, once", _params_owned_once),
    ("graph totals equal the sums over nodes", _totals_over_nodes),
    ("units tile the nodes in execution order", _units_tile_nodes),
    ("unit costs equal the sums over their nodes", _unit_sums),
    ("unit costs are non-negative", _unit_costs_non_negative),
    ("block instances lie within their units", _blocks_in_their_units),
    ("the last cut carries the model outputs", _last_cut_is_output),
    ("shared and tied parameters name their owners", _shared_params),
    ("units of one block type have equal costs", _equal_block_costs),
)


def verify(graph: OpGraph) -> None:
    """Raise :class:`GraphInvariantError` listing every broken invariant of ``graph``."""
    failures = []
    for name, check in CHECKS:
        problems = check(graph)
        if problems:
            failures.append(f"{name}: " + "; ".join(problems))
    if failures:
        raise GraphInvariantError("OpGraph invariants broken:\n  " + "\n  ".join(failures))
