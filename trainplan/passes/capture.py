"""Pass 1, capture: the model as FX graphs on meta/fake tensors, repeated blocks traced once.

``torch.export`` first (transformers 5 models export but do not ``symbolic_trace``), then
``torch.fx.symbolic_trace``. Repeated blocks (structurally identical children of a layer stack)
and ``leaf_modules`` are kept whole in the outer graph (:mod:`trainplan.passes.opaque`); each
block type is then traced once on its own, with the inputs its first call received. A model that
neither front end can trace raises a :class:`TraceError` naming the module and source line that
failed and suggesting ``leaf_modules``. A leaf path inside a repeated block applies to its
block type (the block is traced once, through its first instance).
"""

from __future__ import annotations

import contextlib
import io
import linecache
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from trainplan.errors import TraceError, TrainplanError
from trainplan.ir.facts import TransformerFacts
from trainplan.models import BuiltModel, example_inputs
from trainplan.passes.modules import (
    ParamTable,
    block_paths,
    class_name,
    is_under,
    join,
    match_leaf_modules,
    module_signature,
    param_table,
    repeated_blocks,
)
from trainplan.passes.opaque import (
    OPAQUE_OP,
    CallRecord,
    FlatCall,
    OpaqueKind,
    OpaqueModule,
    TensorMeta,
    call_key,
    flatten_call,
    swapped,
    training,
)
from trainplan.passes.standins import ScalarStandIn

Frontend = Literal["torch.export", "torch.fx.symbolic_trace"]
FRONTENDS: tuple[Frontend, ...] = ("torch.export", "torch.fx.symbolic_trace")
_TORCH_DIR = os.path.dirname(torch.__file__)
# Loggers that narrate a failed export (guards, partial graphs); the TraceError says it instead.
_NOISY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")


@dataclass(frozen=True)
class Traced:
    """One captured graph: of the model (``path == ''``) or of one block type's first instance.

    ``state`` maps placeholder / attribute names to ``(kind, name, tensor)`` with kind ``param``,
    ``buffer`` or ``constant`` and ``name`` relative to ``module``; ``calls`` maps graph nodes standing
    for modules kept whole to their records; ``inputs`` are the flat tensor inputs.
    """

    gm: fx.GraphModule
    frontend: Frontend
    module: nn.Module
    path: str
    inputs: tuple[TensorMeta, ...]
    user_inputs: tuple[str, ...]  # placeholder names of the flat tensor inputs (export)
    state: Mapping[str, tuple[str, str, torch.Tensor]]
    calls: Mapping[str, CallRecord]


@dataclass(frozen=True)
class Captured:
    """The capture of a model: the outer graph plus one graph per repeated block type."""

    model: nn.Module
    outer: Traced
    blocks: Mapping[str, Traced]  # CallRecord.key -> graph of that block type
    block_paths: tuple[str, ...]
    leaf_paths: frozenset[str]
    params: ParamTable
    facts: TransformerFacts | None


def capture(
    built: BuiltModel,
    leaf_modules: Sequence[str] = (),
    *,
    frontends: Sequence[Frontend] = FRONTENDS,
) -> Captured:
    """Trace ``built.module`` at batch 1 on meta tensors, in training mode (restored after)."""
    model = built.module
    # A model may name sub-modules that must stay whole (e.g. a Hugging Face encoder-decoder that
    # the runtime cannot cut into pipeline stages): they become single units.
    leaf_modules = (*leaf_modules, *getattr(model, "keep_whole", {}))
    leaves = match_leaf_modules(model, leaf_modules)
    blocks = block_paths(model, leaves)
    repeated = repeated_blocks(model, blocks)
    opaque: dict[str, OpaqueKind] = {p: "block" for p in repeated if p not in leaves}
    opaque.update({p: "leaf" for p in leaves if not any(is_under(p, b) for b in opaque)})
    spec, in_leaves, _ = flatten_call(example_inputs(built.task, 1, device="meta"), {})
    with training(model):
        outer = trace_call(model, "", spec, in_leaves, opaque, frontends)
        graphs: dict[str, Traced] = {}
        for rec in outer.calls.values():
            if rec.kind == "block" and rec.key not in graphs:
                inner = {p[len(rec.path) + 1 :]: "leaf" for p in leaves if p != rec.path and is_under(p, rec.path)}
                graphs[rec.key] = trace_call(rec.module, rec.path, rec.in_spec, rec.in_leaves, inner, frontends)
    return Captured(model, outer, graphs, blocks, leaves, param_table(model), built.facts)


def trace_call(
    module: nn.Module,
    path: str,
    in_spec: Any,
    in_leaves: tuple[Any, ...],
    opaque: Mapping[str, OpaqueKind],
    frontends: Sequence[Frontend] = FRONTENDS,
) -> Traced:
    """Trace one call of ``module`` with the first front end that succeeds."""
    errors: list[tuple[str, BaseException]] = []
    for frontend in frontends:
        flat = FlatCall(module, in_spec, in_leaves)
        inputs = tuple(x for x in in_leaves if isinstance(x, TensorMeta))
        try:
            if frontend == "torch.export":
                return _export(flat, path, inputs, opaque)
            return _symbolic(flat, path, inputs, opaque)
        except TrainplanError:
            raise
        except Exception as exc:  # every tracer failure is reported below, with where it happened
            errors.append((frontend, exc))
    raise _trace_error(module, path, errors)


def _signatures(module: nn.Module, opaque: Mapping[str, OpaqueKind]) -> dict[str, str]:
    memo: dict[int, str] = {}
    return {rel: module_signature(module.get_submodule(rel), memo) for rel in opaque}


def _export(flat: FlatCall, path: str, inputs: tuple[TensorMeta, ...], opaque: Mapping[str, OpaqueKind]) -> Traced:
    shapes: dict[str, tuple] = {}
    records: dict[str, CallRecord] = {}
    sigs = _signatures(flat.m, opaque)
    stand_ins = {
        rel: OpaqueModule(flat.m.get_submodule(rel), join(path, rel), kind, sigs[rel], shapes, records)
        for rel, kind in opaque.items()
    }
    with swapped(flat.m, stand_ins), _quiet():
        ep = torch.export.export(flat, ([t.empty() for t in inputs],), strict=False)
        state = _export_state(ep, flat)
    gm = ep.graph_module
    calls = {n.name: records[n.args[1]] for n in gm.graph.nodes if n.target is OPAQUE_OP}
    users = tuple(s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT")
    return Traced(gm, "torch.export", flat.m, path, inputs, users, state, calls)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's own account of a failing export (it prints partial graphs to stderr)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _rel_names(module: nn.Module) -> dict[int, str]:
    """Parameter/buffer object id -> its first name inside ``module``."""
    names: dict[int, str] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), name)
    return names


def _export_state(ep: Any, flat: FlatCall) -> dict[str, tuple[str, str, torch.Tensor]]:
    names = _rel_names(flat.m)
    state: dict[str, tuple[str, str, torch.Tensor]] = {}
    for spec in ep.graph_signature.input_specs:
        kind = spec.kind.name
        if kind in ("PARAMETER", "BUFFER"):
            tensor = flat.get_parameter(spec.target) if kind == "PARAMETER" else flat.get_buffer(spec.target)
            role = "param" if kind == "PARAMETER" else "buffer"
            state[spec.arg.name] = (role, names.get(id(tensor), spec.target), tensor)
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            state[spec.arg.name] = ("constant", spec.target, ep.constants[spec.target])
    return state


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: frozenset[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def _symbolic(flat: FlatCall, path: str, inputs: tuple[TensorMeta, ...], opaque: Mapping[str, OpaqueKind]) -> Traced:
    tracer = _LeafTracer(frozenset(join("m", rel) for rel in opaque))
    gm = fx.GraphModule(flat, tracer.trace(flat))
    calls = _fx_calls(gm, path, inputs, opaque, _signatures(flat.m, opaque))
    names = _rel_names(flat.m)
    state = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _fetch(gm, node.target)
            if isinstance(value, torch.Tensor):
                kind = "param" if isinstance(value, nn.Parameter) else "buffer"
                state[node.target] = (kind, names.get(id(value), node.target.removeprefix("m.")), value)
    return Traced(gm, "torch.fx.symbolic_trace", flat.m, path, inputs, (), state, calls)


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Propagate(fx.Interpreter):
    """Runs an FX graph on meta to record the calls of modules kept whole (each type run once)."""

    def __init__(self, gm: fx.GraphModule, path: str, opaque: Mapping[str, OpaqueKind],
                 sigs: Mapping[str, str]) -> None:
        super().__init__(gm)
        self.path, self.opaque, self.sigs = path, opaque, sigs
        self.records: dict[str, CallRecord] = {}
        self.outputs: dict[str, tuple] = {}
        self.current = ""

    def run_node(self, n: fx.Node) -> Any:
        self.current = n.name
        return super().run_node(n)

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        rel = str(target).removeprefix("m.")
        if rel not in self.opaque:
            return super().call_module(target, args, kwargs)
        module = self.fetch_attr(target)
        in_spec, in_leaves, _ = flatten_call(args, kwargs)
        key = call_key(self.sigs[rel], in_spec, in_leaves)
        if key not in self.outputs:
            with ScalarStandIn():
                leaves, spec = pytree.tree_flatten(module(*args, **kwargs))
            self.outputs[key] = (spec, tuple(TensorMeta.of(x) if isinstance(x, torch.Tensor) else x for x in leaves))
        spec, out_leaves = self.outputs[key]
        rec = CallRecord(join(self.path, rel), self.opaque[rel], module, key, in_spec, in_leaves, spec, out_leaves)
        self.records[self.current] = rec
        return rec.outputs([m.empty() for m in rec.tensor_outputs])


def _fx_calls(gm: fx.GraphModule, path: str, inputs: tuple[TensorMeta, ...], opaque: Mapping[str, OpaqueKind],
              sigs: Mapping[str, str]) -> dict[str, CallRecord]:
    if not opaque:
        return {}
    runner = _Propagate(gm, path, opaque, sigs)
    runner.run([t.empty() for t in inputs])
    return runner.records


def _failure_site(exc: BaseException, module: nn.Module, path: str) -> tuple[str, str, str] | None:
    """(module path, class, "file:line `code`") of the innermost model code the error passed through."""
    paths = {id(m): join(path, p) for p, m in module.named_modules()}
    best: tuple[str, str, str] | None = None
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if id(owner) in paths and not frame.f_code.co_filename.startswith(_TORCH_DIR):
            code = linecache.getline(frame.f_code.co_filename, tb.tb_lineno).strip()
            best = (paths[id(owner)], class_name(owner), f"{frame.f_code.co_filename}:{tb.tb_lineno} `{code}`")
        tb = tb.tb_next
    return best


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _trace_error(module: nn.Module, path: str, errors: list[tuple[str, BaseException]]) -> TraceError:
    what = f"module '{path}' ({class_name(module)})" if path else f"the model ({class_name(module)})"
    lines = [f"could not capture {what} as a graph on meta tensors:"]
    site = None
    for frontend, exc in errors:
        here = _failure_site(exc, module, path)
        site = site or here
        where = f" failed in module '{here[0] or '<root>'}' ({here[1]}) at {here[2]}" if here else " failed"
        lines.append(f"  {frontend}{where}: {_first_line(exc)}")
    if site and site[0]:
        lines.append(f"If this module cannot be traced (data-dependent control flow, Python-side effects), "
                     f"keep it whole: add it to model.leaf_modules, e.g. leaf_modules: [{site[1]}] "
                     f"(its class) or ['{site[0]}'] (its path).")
    else:
        lines.append("Keep the part that cannot be traced whole: name its module class or path in "
                     "model.leaf_modules (the root module's own forward cannot be kept whole).")
    return TraceError("\n".join(lines))
