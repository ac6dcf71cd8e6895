"""Execute a captured graph node by node on meta tensors, measuring each node.

The result is a list of :class:`LocalNode` named within that graph. Values are tracked two ways:

* by object (``producer``): which node produced a tensor, for graph edges — a ``getitem`` of a
  list or a module's output tuple returns the same object, so it adds no node;
* by storage (``key``): views share their base's storage, so a tensor an op saves for backward
  (often a view of its input) is keyed by the node that made the memory. Parameters, buffers and
  constants are keyed ``param:``/``buffer:``/``constant:`` and are not activations.

Graph inputs are ``input:<i>``; outputs of a repeated block kept whole are ``<node>.out<j>``
until :mod:`trainplan.passes.annotate` splices the block's own nodes in.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from trainplan.errors import TraceError
from trainplan.passes.capture import Traced
from trainplan.passes.measure import measure
from trainplan.passes.modules import class_name, join
from trainplan.passes.opaque import OPAQUE_OP, CallRecord
from trainplan.passes.standins import ScalarStandIn, resolve_target

STATE_PREFIXES = ("param:", "buffer:", "constant:")


def element_bytes(dtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """Bytes per element when activations are kept in ``compute_dtype`` (floats take its width)."""
    return compute_dtype.itemsize if dtype.is_floating_point else dtype.itemsize


@dataclass(frozen=True, slots=True)
class LocalNode:
    """A measured node, named within its graph (see the module docstring for value names)."""

    name: str
    op: str
    target: str
    module_path: str  # relative to the traced module
    inputs: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    flops_fwd: int
    flops_bwd: int
    param_names: tuple[str, ...]  # relative to the traced module
    saved: tuple[tuple[str, int], ...]
    output_bytes: int
    variant: str = ""  # string keyword arguments of the call (:func:`_variant`), or a convolution's kernel (:func:`_conv_variant`)


@dataclass(frozen=True, slots=True)
class BlockCall:
    """A repeated block kept whole in this graph, at this position among the nodes."""

    name: str
    record: CallRecord
    position: int  # index in ``Run.nodes`` where the block's nodes go
    input_producers: tuple[str, ...]  # per tensor input
    input_keys: tuple[str, ...]  # storage keys per tensor input
    requires_grad: tuple[bool, ...]  # per tensor input


@dataclass(frozen=True)
class Run:
    """A graph run: its measured nodes, the blocks to splice in, and who produced its outputs."""

    nodes: tuple[LocalNode, ...]
    blocks: tuple[BlockCall, ...]
    outputs: tuple[str, ...]  # producers of the output tensors
    output_keys: tuple[str, ...]


def _method(name: str) -> Any:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, name)(*args, **kwargs)

    return call


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    name = getattr(target, "__name__", "")
    for prefix, namespace in (("torch.nn.functional", torch.nn.functional), ("torch", torch)):
        if name and getattr(namespace, name, None) is target:
            return f"{prefix}.{name}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))
    return f"{mod.removeprefix('_')}.{name}" if mod else name


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return _strip_root(str(node.target))
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return _strip_root(list(stack.values())[-1][0])


def _strip_root(path: str) -> str:
    """Module path inside the traced module (graphs are traced through ``FlatCall.m``)."""
    return "" if path == "m" else path[2:] if path.startswith("m.") else path


class Interpreter:
    """Runs one :class:`Traced` graph; see the module docstring."""

    def __init__(self, traced: Traced, compute_dtype: torch.dtype,
                 block_kinds: frozenset[str] = frozenset({"block"})) -> None:
        self.traced = traced
        self.dtype = compute_dtype
        self.block_kinds = block_kinds
        self.env: dict[str, Any] = {}
        self.producer: dict[int, str] = {}
        self.key: dict[int, str] = {}
        self.alive: list[Any] = []  # keeps every tensor alive so ids and storages stay unique
        self.storage_bytes: dict[int, int] = {}  # saved-for-backward bytes of each storage
        self.nodes: list[LocalNode] = []
        self.blocks: list[BlockCall] = []
        self.state_names = {id(t): n for n, t in [*traced.module.named_buffers(remove_duplicate=False),
                                                   *traced.module.named_parameters(remove_duplicate=False)][::-1]}

    # -- value bookkeeping -------------------------------------------------------------------
    def _storage(self, t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def _register(self, t: torch.Tensor, name: str, key: str | None = None, nbytes: int | None = None) -> None:
        self.alive.append(t)
        self.producer.setdefault(id(t), name)
        self.key.setdefault(self._storage(t), key or name)
        self.storage_bytes.setdefault(self._storage(t), self._saved_bytes(t) if nbytes is None else nbytes)

    def key_of(self, t: torch.Tensor) -> str:
        return self.key.get(self._storage(t), "")

    def _bytes(self, t: torch.Tensor) -> int:
        return t.numel() * element_bytes(t.dtype, self.dtype)

    def _saved_bytes(self, t: torch.Tensor) -> int:
        return t.untyped_storage().nbytes() // max(t.element_size(), 1) * element_bytes(t.dtype, self.dtype)

    # -- running -----------------------------------------------------------------------------
    def run(self, inputs: Sequence[torch.Tensor]) -> Run:
        for i, t in enumerate(inputs):
            self._register(t, f"input:{i}")
        with ScalarStandIn():
            for node in self.traced.gm.graph.nodes:
                self._step(node, list(inputs))
        out = self.env["output"]
        tensors = tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return Run(tuple(self.nodes), tuple(self.blocks), tuple(self.producer[id(t)] for t in tensors),
                   tuple(self.key_of(t) for t in tensors))

    def _step(self, node: fx.Node, inputs: list[torch.Tensor]) -> None:
        if node.op == "placeholder":
            self.env[node.name] = self._placeholder(node, inputs)
        elif node.op == "get_attr":
            self.env[node.name] = self._state(node.target, self.traced.state.get(node.target))
        elif node.op == "output":
            self.env["output"] = fx.node.map_arg(node.args[0], lambda n: self.env[n.name])
        else:
            self.env[node.name] = self._call(node)

    def _placeholder(self, node: fx.Node, inputs: list[torch.Tensor]) -> Any:
        if node.name in self.traced.state:
            return self._state(node.name, self.traced.state[node.name])
        if self.traced.user_inputs:
            return inputs[self.traced.user_inputs.index(node.name)]
        return inputs  # symbolic_trace: one placeholder holding the list of tensor inputs

    def _state(self, name: str, entry: tuple[str, str, torch.Tensor] | None) -> Any:
        if entry is None:
            return functools.reduce(getattr, name.split("."), self.traced.gm)
        kind, rel, tensor = entry
        self._register(tensor, f"{kind}:{rel}")
        return tensor

    def _call(self, node: fx.Node) -> Any:
        args = fx.node.map_arg(node.args, lambda n: self.env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n.name])
        record = self.traced.calls.get(node.name)
        if record is not None and record.kind in self.block_kinds:
            return self._block(node, record, args, kwargs)
        if record is not None:
            return self._leaf(node, record, args, kwargs)
        if node.op == "call_function" and node.target is operator.getitem and not isinstance(args[0], torch.Tensor):
            return args[0][args[1]]  # picks an existing value out of a list/tuple: no new node
        if node.op == "call_module":
            module = self.traced.gm.get_submodule(str(node.target))
            return self._measured(node, module, args, kwargs, module=module, path=_module_path(node))
        if node.op == "call_method":
            return self._measured(node, _method(str(node.target)), args, kwargs, path=_module_path(node))
        return self._measured(node, resolve_target(node.target), args, kwargs, path=_module_path(node))

    def _rel(self, path: str) -> str:
        base = self.traced.path
        return path if not base else path[len(base) + 1 :]

    def _leaf(self, node: fx.Node, record: CallRecord, args: tuple, kwargs: dict) -> Any:
        path = self._rel(record.path)
        if node.target is not OPAQUE_OP:
            return self._measured(node, record.module, args, kwargs, module=record.module, path=path)
        call_args, call_kwargs = record.call_args(list(args[0]))
        out = self._measured(node, record.module, call_args, call_kwargs, module=record.module, path=path)
        return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    def _block(self, node: fx.Node, record: CallRecord, args: tuple, kwargs: dict) -> Any:
        if node.target is OPAQUE_OP:
            tensors = list(args[0])
        else:
            tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        trainable = any(p.requires_grad for p in record.module.parameters())
        wants = trainable or any(t.requires_grad for t in tensors)
        self.blocks.append(BlockCall(node.name, record, len(self.nodes),
                                     tuple(self.producer.get(id(t), "") for t in tensors),
                                     tuple(self.key_of(t) for t in tensors),
                                     tuple(bool(t.requires_grad) for t in tensors)))
        outs = [m.empty(requires_grad=wants) for m in record.tensor_outputs]
        for j, t in enumerate(outs):
            self._register(t, f"{node.name}.out{j}")
        return outs if node.target is OPAQUE_OP else record.outputs(outs)

    def _register_module_state(self, module: torch.nn.Module) -> list[torch.Tensor]:
        for name, b in module.named_buffers(remove_duplicate=False):
            self._register(b, f"buffer:{self.state_names.get(id(b), name)}")
        params = []
        for name, p in module.named_parameters(remove_duplicate=False):
            self._register(p, f"param:{self.state_names.get(id(p), name)}")
            params.append(p)
        return params

    def _measured(self, node: fx.Node, fn: Any, args: tuple, kwargs: dict, *, module: torch.nn.Module | None = None,
                  path: str = "") -> Any:
        params = self._register_module_state(module) if module is not None else []
        try:
            m = measure(fn, args, kwargs, params, whole_module=module is not None)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            raise self._op_error(node, module, path, exc) from None
        for c, original in m.clones:
            # A clone stands for the value it copies: same key, and the bytes of the original's storage.
            self._register(c, self.producer.get(id(original), ""), self.key_of(original),
                           self.storage_bytes.get(self._storage(original)))
        new = [t for t in pytree.tree_leaves(m.output) if isinstance(t, torch.Tensor) and id(t) not in self.producer]
        for t in new:
            self._register(t, node.name)
        if new:
            self.nodes.append(self._local(node, module, path, args, kwargs, params, m, new))
        return m.output

    def _op_error(self, node: fx.Node, module: Any, path: str, exc: Exception) -> TraceError:
        what = class_name(module) if module is not None else _target_name(node)
        where = join(self.traced.path, path) or "<root>"
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__).rstrip(".")
        return TraceError(f"could not cost {what} (graph node {node.name!r}, module '{where}') on meta tensors: "
                          f"{type(exc).__name__}: {first}. If it is a module of your own whose code runs only on "
                          "real data, keep it whole with model.leaf_modules; an operator without a meta kernel "
                          "or meta backward cannot be costed.")

    def _local(self, node: fx.Node, module: Any, path: str, args: tuple, kwargs: dict, params: list, m: Any,
               outs: list[torch.Tensor]) -> LocalNode:
        arg_tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        read = [self.key_of(t) for t in [*arg_tensors, *params]]
        inputs = [self.producer.get(id(t), "") for t in arg_tensors if not self.key_of(t).startswith(STATE_PREFIXES)]
        whole = module is not None
        return LocalNode(
            name=node.name,
            op="call_module" if whole else node.op,
            target=class_name(module) if whole else _target_name(node),
            module_path=path,
            inputs=tuple(dict.fromkeys(i for i in inputs if i)),
            shapes=tuple(tuple(int(s) for s in t.shape) for t in outs),
            dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in outs),
            flops_fwd=m.flops_fwd,
            flops_bwd=m.flops_bwd,
            param_names=tuple(dict.fromkeys(r.removeprefix("param:") for r in read if r.startswith("param:"))),
            saved=self._saved(node.name, m.saved),
            output_bytes=sum(self._bytes(t) for t in outs if not self.key_of(t).startswith(STATE_PREFIXES)),
            variant="" if whole else _conv_variant(_target_name(node), args, kwargs) or _variant(kwargs),
        )

    def _saved(self, name: str, saved: tuple[torch.Tensor, ...]) -> tuple[tuple[str, int], ...]:
        out: dict[str, int] = {}
        for i, t in enumerate(saved):
            key = self.key_of(t)
            if not key:
                key = f"{name}#{i}"
                self._register(t, key)
            if not key.startswith(STATE_PREFIXES):
                out.setdefault(key, self.storage_bytes.get(self._storage(t), self._saved_bytes(t)))
        return tuple(out.items())


def _variant(kwargs: dict) -> str:
    """The string keyword arguments of an operator call, ``k=v`` joined by commas in name order.

    Strings select a different kernel rather than a size (``F.gelu(x, approximate="tanh")`` runs a
    tanh polynomial 3.5x slower than the ``erf`` GeLU on a CPU; ``reduction=``, ``padding_mode=``,
    ``mode=``), so the measured-operator cost model looks them up as their own operator."""
    return ",".join(f"{k}={v}" for k, v in sorted(kwargs.items()) if isinstance(v, str))


# Input elements per sample up to which torch's CPU convolution runs its own im2col + GEMM kernel
# at one sample instead of oneDNN (aten/src/ATen/native/Convolution.cpp, ConvParams::use_mkldnn,
# the clause "for some case, native is faster").
NATIVE_CONV_MAX_INPUT = 20480


def _conv_variant(target: str, args: tuple, kwargs: dict) -> str:
    """``'native'`` for a 2-D convolution that torch runs with its own kernel on a CPU when fed one
    sample in fp32, else ``''``.

    torch 2.x picks oneDNN for an fp32 CPU convolution unless the batch is 1, groups is 1, the kernel
    is at most 3 wide in some dimension and the input holds at most :data:`NATIVE_CONV_MAX_INPUT`
    elements (``ConvParams::use_mkldnn``; an unstrided 1x1 convolution on one thread also stays
    native at batches below 16, which this leaves out). The two kernels cost differently: on this
    project's machine oneDNN pays 60-80 us of fixed forward time and 170-210 us backward per call
    where the native kernel pays about 10 and 25-30, and the native backward runs at half the forward's
    FLOP rate. The cost model looks ``conv2d[native]`` up at a micro-batch of 1 only
    (:func:`trainplan.planner.cost.ops.lookup`).
    """
    name = target.split(".")[1] if target.startswith("aten.") else target.rsplit(".", 1)[-1]
    if name != "conv2d":  # aten.conv2d.default, torch.nn.functional.conv2d, torch.conv2d
        return ""
    named = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(named, args)) | kwargs
    x, w, groups = bound.get("input"), bound.get("weight"), bound.get("groups", 1)
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) or w.dim() != 4:
        return ""
    per_sample = x.numel() // x.shape[0] if x.dim() == 4 and x.shape[0] else x.numel()
    small_kernel = not (w.shape[-1] > 3 and w.shape[-2] > 3)
    return "native" if groups == 1 and small_kernel and per_sample <= NATIVE_CONV_MAX_INPUT else ""
