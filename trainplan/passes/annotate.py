"""Pass 2, annotate: every node with shapes, dtypes, forward/backward FLOPs, parameters and
activation bytes, as an :class:`~trainplan.ir.graph.OpGraph` (not yet linearised).

The outer graph runs once; each repeated block type runs once (per pattern of which inputs need
gradients) and its measured nodes are copied into every instance, renamed ``<instance>/<node>``,
with the instance's inputs, parameters and module paths. All costs are of one sample (batch 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trainplan.ir.graph import OpGraph, OpNode, ParamInfo, TensorValue
from trainplan.passes.capture import Captured
from trainplan.passes.interpret import BlockCall, Interpreter, LocalNode, Run, element_bytes
from trainplan.passes.modules import class_name, join


def annotate(captured: Captured, dtype: torch.dtype = torch.float32) -> OpGraph:
    """Measure the captured graphs on meta tensors; activations counted at ``dtype``'s width."""
    inputs = [m.empty() for m in captured.outer.inputs]
    outer = Interpreter(captured.outer, dtype).run(inputs)
    inner: dict[tuple[str, tuple[bool, ...]], Run] = {}
    for call in outer.blocks:
        k = (call.record.key, call.requires_grad)
        if k not in inner:
            traced = captured.blocks[call.record.key]
            block_inputs = [m.empty(requires_grad=rg) for m, rg in zip(traced.inputs, call.requires_grad)]
            inner[k] = Interpreter(traced, dtype, block_kinds=frozenset()).run(block_inputs)
    stitch = _Stitch(captured, frozenset(captured.block_paths))
    for position in range(len(outer.nodes) + 1):
        for call in (c for c in outer.blocks if c.position == position):
            stitch.splice(call, inner[(call.record.key, call.requires_grad)])
        if position < len(outer.nodes):
            stitch.emit(outer.nodes[position], prefix="", path="", edge=stitch.edge, key=stitch.key)
    return _graph(captured, stitch, outer, inputs, dtype)


@dataclass
class _Stitch:
    """Builds the flat node list: outer nodes with block instances spliced in, params owned once."""

    captured: Captured
    block_paths: frozenset[str]
    nodes: list[OpNode] = field(default_factory=list)
    edge_alias: dict[str, str] = field(default_factory=dict)
    key_alias: dict[str, str] = field(default_factory=dict)
    owned: set[str] = field(default_factory=set)
    order: list[str] = field(default_factory=list)
    calls_seen: dict[str, int] = field(default_factory=dict)

    def edge(self, name: str) -> str:
        while name in self.edge_alias:
            name = self.edge_alias[name]
        return name

    def key(self, name: str) -> str:
        while name in self.key_alias:
            name = self.key_alias[name]
        return name

    def block_of(self, path: str) -> str:
        parts = path.split(".") if path else []
        for i in range(len(parts), 0, -1):
            candidate = ".".join(parts[:i])
            if candidate in self.block_paths:
                return candidate
        return ""

    def splice(self, call: BlockCall, run: Run) -> None:
        path = call.record.path
        nth = self.calls_seen.get(path, 0)
        self.calls_seen[path] = nth + 1
        prefix = f"{path}/" if nth == 0 else f"{path}@{nth}/"

        def local(mapping: tuple[str, ...], resolve: Callable[[str], str]) -> Callable[[str], str]:
            def rename(name: str) -> str:
                if name.startswith("input:"):
                    return resolve(mapping[int(name.removeprefix("input:"))])
                return prefix + name

            return rename

        edge, key = local(call.input_producers, self.edge), local(call.input_keys, self.key)
        for n in run.nodes:
            self.emit(n, prefix=prefix, path=path, edge=edge, key=key)
        for j, (producer, storage) in enumerate(zip(run.outputs, run.output_keys)):
            self.edge_alias[f"{call.name}.out{j}"] = edge(producer)
            self.key_alias[f"{call.name}.out{j}"] = key(storage)

    def emit(self, n: LocalNode, *, prefix: str, path: str, edge: Callable[[str], str],
             key: Callable[[str], str]) -> None:
        table = self.captured.params
        names = tuple(dict.fromkeys(table.name(join(path, p)) for p in n.param_names))
        owned = [p for p in names if p not in self.owned]
        self.owned.update(owned)
        self.order.extend(owned)
        module_path = join(path, n.module_path)
        saved = tuple((key(k), b) for k, b in n.saved)
        self.nodes.append(OpNode(
            name=prefix + n.name,
            op=n.op,  # type: ignore[arg-type]
            target=n.target,
            module_path=module_path,
            inputs=tuple(edge(i) for i in n.inputs),
            shapes=n.shapes,
            dtypes=n.dtypes,
            flops_fwd=float(n.flops_fwd),
            flops_bwd=float(n.flops_bwd),
            param_names=names,
            params=sum(table.numel[p] for p in owned),
            param_bytes=sum(table.nbytes[p] for p in owned),
            saved=saved,
            activation_bytes=sum(b for _, b in saved),
            output_bytes=n.output_bytes,
            block=path or self.block_of(module_path),
            variant=n.variant,
        ))


def _graph(captured: Captured, stitch: _Stitch, outer: Run, inputs: list[torch.Tensor], dtype: torch.dtype) -> OpGraph:
    nodes = tuple(stitch.nodes)
    table = captured.params
    values = tuple(TensorValue(f"input:{i}", tuple(t.shape), str(t.dtype).removeprefix("torch."),
                               t.numel() * element_bytes(t.dtype, dtype)) for i, t in enumerate(inputs))
    outputs = tuple(stitch.edge(o) for o in outer.outputs)
    # Values are whole node outputs (as cuts count them); a tensor returned twice is held once.
    size = {**{v.name: v.bytes for v in values}, **{n.name: n.output_bytes for n in nodes}}
    return OpGraph(
        nodes=nodes,
        inputs=values,
        outputs=outputs,
        output_bytes=sum(size[o] for o in dict.fromkeys(outputs)),
        block_paths=captured.block_paths,
        module_classes=tuple((p, class_name(m)) for p, m in captured.model.named_modules()),
        dtype=str(dtype).removeprefix("torch."),
        dtype_bytes=dtype.itemsize,
        frontend=captured.outer.frontend,
        params=sum(n.params for n in nodes),
        param_bytes=sum(n.param_bytes for n in nodes),
        flops_fwd=sum(n.flops_fwd for n in nodes),
        flops_bwd=sum(n.flops_bwd for n in nodes),
        facts=captured.facts,
        parameters=tuple(ParamInfo(p, table.aliases[p], table.numel[p], table.nbytes[p]) for p in stitch.order),
        unused_params=tuple(p for p in table.numel if p not in stitch.owned),
    )
