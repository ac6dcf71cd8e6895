"""OpGraph: the traced model as frozen data — operator nodes, pipeline-cuttable units, costs.

The front end (:mod:`trainplan.passes`) builds it: capture on meta/fake tensors → annotate every
node → linearise into units → name repeated block types. Everything here is plain data (no torch
objects), immutable, and changes only through :meth:`OpGraph.replace`.

Conventions (all quantities are per ONE sample: the graph is traced at batch 1):

* FLOPs count a multiply-add as 2 (``torch.utils.flop_counter``); ``flops_bwd`` is the backward
  pass (gradients of inputs that require them and of parameters). Ops whose cost does not grow
  with the batch (position embeddings, masks) are counted once, a slight over-estimate per
  sample at micro-batch > 1.
* Activation and output bytes count floating-point tensors at the width of the graph's compute
  ``dtype`` (the planner passes bf16 for mixed precision) and other tensors at their own width.
* Parameter bytes are at the parameters' own dtype (the model as built, fp32 master weights).
* A parameter is *owned* by the first node (and so the first unit) that reads it; every other
  unit that reads it *shares* it. Tied weights are therefore counted once in the totals.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from trainplan.ir.facts import TransformerFacts

UnitKind = Literal["embedding", "block", "head", "other"]
NodeOp = Literal["call_function", "call_module", "call_method"]


@dataclass(frozen=True, slots=True)
class OpNode:
    """One operator of the traced graph, in execution order.

    Nodes of a block captured once and repeated are named ``<instance>/<node>``
    (``layers.17/linear_2``); ``inputs`` name producer nodes or graph inputs (``input:0``).
    ``saved`` lists the tensors the op keeps for backward as ``(value, bytes)``; a value saved by
    several nodes (q, k and v projections all save their input) has the same key in each, so a
    unit's activation memory is the sum over its *distinct* keys not already saved by an earlier unit
    (see :func:`unit_activation_bytes`).
    """

    name: str
    op: NodeOp
    target: str  # 'aten.linear.default', 'torch.nn.functional.gelu', 'view', or a module class
    module_path: str  # innermost module running the op; '' is the root module's own forward
    inputs: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]  # output tensors, as traced
    dtypes: tuple[str, ...]  # output tensors, as traced ('float32', 'int64', ...)
    flops_fwd: float
    flops_bwd: float
    param_names: tuple[str, ...]  # canonical names of the parameters the op reads
    params: int  # elements of the parameters this node owns (it is their first reader)
    param_bytes: int
    saved: tuple[tuple[str, int], ...]
    activation_bytes: int  # sum of ``saved`` bytes (not deduplicated across nodes)
    output_bytes: int  # bytes of the output tensors (0 for views of parameters or buffers)
    block: str = ""  # block instance (module path) holding the node, '' outside any block
    variant: str = ""  # string arguments that pick a different kernel ('approximate=tanh' of a GeLU), '' none


@dataclass(frozen=True, slots=True)
class TensorValue:
    """A graph input: a tensor fed to the model (``input:0`` are the token ids of an lm)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int


@dataclass(frozen=True, slots=True)
class ParamInfo:
    """A parameter read by the graph: canonical name, every name it has (tied), size."""

    name: str
    aliases: tuple[str, ...]  # canonical name first
    numel: int
    bytes: int  # at the parameter's own dtype


@dataclass(frozen=True, slots=True)
class Unit:
    """A pipeline-cuttable run of consecutive nodes ``nodes[first:stop]``.

    ``params``/``param_bytes`` count the parameters the unit owns; ``shared_params`` are read here
    but owned by an earlier unit (a tied LM head shares the embedding), so a stage holding this
    unit without the owner also needs ``shared_param_bytes`` and must synchronise their gradients.
    ``output_bytes`` is what crosses a cut placed right after the unit: every value produced at or
    before it and read after it (skip connections included); for the last unit, the model outputs.
    ``tied_bytes_after`` is the parameters read on both sides of that cut (a tied embedding and LM
    head): a stage on each side holds a copy and their gradients are summed once per step.
    """

    name: str  # 'layers.17', 'embedding', 'head'
    kind: UnitKind
    modules: tuple[str, ...]  # module paths whose forward the unit runs
    block_type: str  # signature; identical repeated blocks share it ('' until named)
    first: int
    stop: int
    params: int
    param_bytes: int
    tied_params: tuple[str, ...]  # owned here and read by other units too
    shared_params: tuple[str, ...]  # read here, owned by another unit
    shared_param_bytes: int
    flops_fwd: float
    flops_bwd: float
    activation_bytes: int  # distinct tensors saved for backward by the unit's nodes and by no earlier unit
    output_bytes: int
    tied_bytes_after: int = 0

    @property
    def flops(self) -> float:
        """Forward plus backward FLOPs of one sample."""
        return self.flops_fwd + self.flops_bwd


@dataclass(frozen=True, slots=True)
class BlockGroup:
    """A run of consecutive units of one block type (``layers.0-95 ×96``), for display."""

    block_type: str
    first: int  # index of the first unit
    count: int
    first_name: str
    last_name: str

    @property
    def label(self) -> str:
        if self.count == 1:
            return self.first_name
        head, _, first_idx = self.first_name.rpartition(".")
        last_head, _, last_idx = self.last_name.rpartition(".")
        if head and head == last_head and first_idx.isdigit() and last_idx.isdigit():
            return f"{head}.{first_idx}-{last_idx} ×{self.count}"
        return f"{self.first_name}..{self.last_name} ×{self.count}"


@dataclass(frozen=True, slots=True)
class OpGraph:
    """The traced model. ``units`` is empty until the graph is linearised.

    ``tied[i]`` is a group of parameter names sharing one storage (or one parameter read by
    several units); ``tied_units[i]`` the units holding it, owner first. The totals equal the sums
    over nodes (and over units once linearised); :func:`trainplan.passes.verify` checks it.
    """

    nodes: tuple[OpNode, ...]
    inputs: tuple[TensorValue, ...]
    outputs: tuple[str, ...]  # producers of the model's output tensors
    output_bytes: int  # bytes of the model's output tensors
    block_paths: tuple[str, ...]  # module paths of block instances (children of layer stacks)
    module_classes: tuple[tuple[str, str], ...]  # (module path, class name)
    dtype: str  # compute dtype of activations ('float32', 'bfloat16')
    dtype_bytes: int
    frontend: str  # 'torch.export' or 'torch.fx.symbolic_trace'
    params: int
    param_bytes: int
    flops_fwd: float
    flops_bwd: float
    facts: TransformerFacts | None = None
    units: tuple[Unit, ...] = ()
    tied: tuple[tuple[str, ...], ...] = ()
    tied_units: tuple[tuple[str, ...], ...] = ()
    parameters: tuple[ParamInfo, ...] = ()  # every parameter a node reads, in order of first use
    unused_params: tuple[str, ...] = ()  # parameters no node reads (not in the totals)

    def replace(self, **changes: object) -> "OpGraph":
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def activation_bytes(self) -> int:
        """Saved-for-backward bytes of one sample over all units."""
        return sum(u.activation_bytes for u in self.units)

    @property
    def flops(self) -> float:
        return self.flops_fwd + self.flops_bwd

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(f"no unit named {name!r}; units: {', '.join(u.name for u in self.units[:8])}...")

    def unit_nodes(self, unit: Unit) -> tuple[OpNode, ...]:
        return self.nodes[unit.first : unit.stop]

    def module_class(self, path: str) -> str:
        return dict(self.module_classes).get(path, "")

    def block_groups(self) -> tuple[BlockGroup, ...]:
        """Runs of consecutive units sharing a non-empty block type; other units alone."""
        groups: list[BlockGroup] = []
        for i, u in enumerate(self.units):
            last = groups[-1] if groups else None
            if last and u.block_type and last.block_type == u.block_type and last.first + last.count == i:
                groups[-1] = replace(last, count=last.count + 1, last_name=u.name)
            else:
                groups.append(BlockGroup(u.block_type, i, 1, u.name, u.name))
        return tuple(groups)


def unit_activation_bytes(nodes: tuple[OpNode, ...] | list[OpNode], earlier: Container[str] = ()) -> int:
    """Bytes of the distinct tensors a run of nodes saves for backward (each key counted once),
    leaving out the keys in ``earlier`` (saved by an earlier unit, which counts them: one storage,
    as ``torch.autograd.graph.saved_tensors_hooks`` sees it, see :func:`saved_keys_before`)."""
    seen: dict[str, int] = {}
    for n in nodes:
        for key, size in n.saved:
            if key not in earlier:
                seen.setdefault(key, size)
    return sum(seen.values())


def saved_keys_before(nodes: Sequence[OpNode], spans: Sequence[tuple[int, int]]) -> list[frozenset[str]]:
    """Per unit span ``(first, stop)`` of ``nodes``, the keys saved by the nodes of the spans before it.

    A tensor saved by ops of two units (a ReLU's output kept by the ReLU and by the next block's
    convolution) is one storage in memory; it counts in the first unit that saves it."""
    out, seen = [], set()
    for first, stop in spans:
        out.append(frozenset(seen))
        seen.update(k for n in nodes[first:stop] for k, _ in n.saved)
    return out
