"""Pass 3, linearise: cut the node sequence into pipeline units and cost each cut.

Each node belongs to a *unit root*: its block instance (``layers.17``), or else the outermost
module on its path that is not an ancestor of a layer stack (``wte``, ``transformer.ln_f``,
``lm_head``). Nodes of the root's own forward (``x = tok + pos``, mask construction) join the
unit before them (the first unit, if none). Consecutive nodes of one root form a segment. With
layer stacks, everything before the first block is one unit (``embedding`` when it looks up an
embedding table), everything after the last block is one ``head`` unit, and each block instance
or in-between segment is a unit; without stacks, each segment is a unit.

A cut right after unit ``i`` carries every value produced at or before ``i`` and read after it —
the residual stream, skip connections to later units, masks and rotary tables every layer reads
— and, from the unit producing them on, the model's outputs. Values are whole node outputs, so
a node with several outputs counts all of them. Parameters read on both sides of the cut (tied
weights) are reported apart (``tied_bytes_after``): they are synchronised per step, not sent per
sample.

A unit's activation bytes are the distinct tensors its ops save for backward that no earlier unit
saved: a tensor saved on both sides of a unit boundary — a ResNet block's ReLU output, kept by
the ReLU for its backward and by the next block's convolutions as their input — is one storage
(``torch.autograd.graph.saved_tensors_hooks`` counts it once), so the unit totals add up to the
model's. It counts where it is first *saved*, not where it is produced: a transformer layer's
residual output is produced by the add of layer ``i`` (which saves nothing) and first saved by the
norm of layer ``i + 1``, and a pipeline stage starting at ``i + 1`` holds it (its received copy)
while the stage ending at ``i`` does not. What the rule misses: a pipeline stage holds its own
received copy of every tensor from before its first unit that its units save, which is counted
in an earlier stage when an earlier unit saved it too — the input of a block after a cut that the
ReLU before the cut saved, or rotary tables the model computes once and every layer saves. The
first stage has no such tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainplan.ir.graph import OpGraph, OpNode, Unit, UnitKind, saved_keys_before, unit_activation_bytes


def linearise(graph: OpGraph) -> OpGraph:
    """The graph with ``units`` (in execution order), ``tied`` and ``tied_units`` filled in."""
    owners = _glue(_owners(graph))
    spans = _units(graph.nodes, owners, frozenset(graph.block_paths))
    bytes_after = _crossing_bytes(graph, spans)
    readers = _readers(graph.nodes, spans)
    sizes = {p.name: p.bytes for p in graph.parameters}
    spanning = _spanning_param_bytes(readers, sizes, len(spans))
    earlier = saved_keys_before(graph.nodes, [(s.first, s.stop) for s in spans])
    units = tuple(_unit(graph, span, i, bytes_after[i], readers, sizes, spanning[i], earlier[i])
                  for i, span in enumerate(spans))
    tied, tied_units = _tied(graph, units, readers)
    return graph.replace(units=units, tied=tied, tied_units=tied_units)


def _stack_ancestors(block_paths: Sequence[str]) -> frozenset[str]:
    """Modules enclosing a layer stack (their own forward only wires children together)."""
    out = {""}
    for path in block_paths:
        parts = path.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return frozenset(out)


def _root(path: str, ancestors: frozenset[str]) -> str | None:
    parts = path.split(".") if path else []
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix not in ancestors:
            return prefix
    return None


def _owners(graph: OpGraph) -> list[str | None]:
    ancestors = _stack_ancestors(graph.block_paths)
    return [n.block or _root(n.module_path, ancestors) for n in graph.nodes]


def _glue(owners: list[str | None]) -> list[str]:
    first = next((o for o in owners if o is not None), "")
    out, last = [], first
    for o in owners:
        last = o if o is not None else last
        out.append(last)
    return out


@dataclass(slots=True)
class _Span:
    """A unit under construction (its name may still get an ``@n`` suffix)."""

    name: str
    kind: UnitKind
    roots: list[str]
    first: int
    stop: int


def _segments(owners: list[str]) -> list[tuple[str, int, int]]:
    segs: list[tuple[str, int, int]] = []
    for i, o in enumerate(owners):
        if segs and segs[-1][0] == o:
            segs[-1] = (o, segs[-1][1], i + 1)
        else:
            segs.append((o, i, i + 1))
    return segs


def _is_embedding(node: OpNode) -> bool:
    return "embedding" in node.target.lower()


def _units(nodes: tuple[OpNode, ...], owners: list[str], blocks: frozenset[str]) -> list[_Span]:
    segs = _segments(owners)
    is_block = [owner in blocks for owner, _, _ in segs]
    if not any(is_block):
        spans = [_Span(o or "model", "other", [o], a, b) for o, a, b in segs]
        return _unique(spans)
    first_block = is_block.index(True)
    last_block = len(is_block) - 1 - is_block[::-1].index(True)
    spans: list[_Span] = []
    if first_block > 0:
        pre = segs[:first_block]
        kind: UnitKind = "embedding" if any(_is_embedding(n) for n in nodes[pre[0][1] : pre[-1][2]]) else "other"
        spans.append(_Span("embedding" if kind == "embedding" else "stem", kind, [o for o, _, _ in pre],
                           pre[0][1], pre[-1][2]))
    for (owner, a, b), block in zip(segs[first_block : last_block + 1], is_block[first_block : last_block + 1]):
        spans.append(_Span(owner, "block" if block else "other", [owner], a, b))
    if last_block < len(segs) - 1:
        post = segs[last_block + 1 :]
        spans.append(_Span("head", "head", [o for o, _, _ in post], post[0][1], post[-1][2]))
    return _unique(spans)


def _unique(spans: list[_Span]) -> list[_Span]:
    """A module run in two separate stretches gives two units: ``name`` and ``name@1``."""
    seen: dict[str, int] = {}
    for s in spans:
        n = seen.get(s.name, 0)
        seen[s.name] = n + 1
        if n:
            s.name = f"{s.name}@{n}"
    return spans


def _crossing_bytes(graph: OpGraph, spans: list[_Span]) -> list[int]:
    """Bytes live across the cut after each unit (difference array over unit indices)."""
    unit_of: dict[str, int] = {}
    size: dict[str, int] = {v.name: v.bytes for v in graph.inputs}
    produced: dict[str, int] = {v.name: 0 for v in graph.inputs}
    for u, s in enumerate(spans):
        for n in graph.nodes[s.first : s.stop]:
            unit_of[n.name], produced[n.name], size[n.name] = u, u, n.output_bytes
    last_use = dict(produced)
    for n in graph.nodes:
        for v in n.inputs:
            last_use[v] = max(last_use.get(v, 0), unit_of[n.name])
    for v in graph.outputs:
        last_use[v] = len(spans)
    diff = [0] * (len(spans) + 1)
    for v, end in last_use.items():
        if end > produced[v]:
            diff[produced[v]] += size[v]
            diff[end] -= size[v]
    return _prefix_sums(diff)


def _readers(nodes: tuple[OpNode, ...], spans: list[_Span]) -> dict[str, list[int]]:
    """Parameter -> units reading it, in order (the first is its owner: owners are first readers)."""
    readers: dict[str, list[int]] = {}
    for u, s in enumerate(spans):
        for n in nodes[s.first : s.stop]:
            for p in n.param_names:
                units = readers.setdefault(p, [])
                if not units or units[-1] != u:
                    units.append(u)
    return readers


def _spanning_param_bytes(readers: dict[str, list[int]], sizes: dict[str, int], n: int) -> list[int]:
    """Bytes of parameters read both at/before and after each cut (difference array over cuts)."""
    diff = [0] * (n + 1)
    for p, units in readers.items():
        if units[-1] > units[0]:
            diff[units[0]] += sizes[p]
            diff[units[-1]] -= sizes[p]
    return _prefix_sums(diff)


def _prefix_sums(diff: list[int]) -> list[int]:
    out, running = [], 0
    for d in diff[:-1]:
        running += d
        out.append(running)
    return out


def _unit(graph: OpGraph, span: _Span, index: int, output_bytes: int, readers: dict[str, list[int]],
          sizes: dict[str, int], tied_bytes_after: int, saved_earlier: frozenset[str]) -> Unit:
    mine = graph.nodes[span.first : span.stop]
    read = list(dict.fromkeys(p for n in mine for p in n.param_names))
    shared = tuple(p for p in read if readers[p][0] != index)
    return Unit(
        name=span.name,
        kind=span.kind,
        modules=tuple(dict.fromkeys(r for r in span.roots if r)),
        block_type="",
        first=span.first,
        stop=span.stop,
        params=sum(n.params for n in mine),
        param_bytes=sum(n.param_bytes for n in mine),
        tied_params=tuple(p for p in read if readers[p][0] == index and len(readers[p]) > 1),
        shared_params=shared,
        shared_param_bytes=sum(sizes[p] for p in shared),
        flops_fwd=sum(n.flops_fwd for n in mine),
        flops_bwd=sum(n.flops_bwd for n in mine),
        activation_bytes=unit_activation_bytes(mine, saved_earlier),
        output_bytes=output_bytes,
        tied_bytes_after=tied_bytes_after,
    )


def _tied(graph: OpGraph, units: tuple[Unit, ...], readers: dict[str, list[int]]
          ) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]:
    """Parameters with several names or read by several units, and the units holding them."""
    groups, holders = [], []
    for p in graph.parameters:
        held = readers.get(p.name, [])
        if len(p.aliases) > 1 or len(held) > 1:
            groups.append(p.aliases)
            holders.append(tuple(units[u].name for u in held))
    return tuple(groups), tuple(holders)
