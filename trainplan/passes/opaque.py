"""Modules kept whole while tracing: repeated blocks (traced once, apart) and ``leaf_modules``.

``torch.export`` has no notion of a leaf module, and tracing 96 identical layers costs 96 times
one. So, for the duration of a capture, each such module is swapped for an :class:`OpaqueModule`
that runs the real module once per input signature on fake tensors *without recording it* (to
learn its outputs) and records one ``trainplan::opaque_module`` node in the graph instead. The
op's only job is to stand in the graph with the right output shapes; the block itself is traced
separately (:func:`trainplan.passes.capture.capture`) through :class:`FlatCall`, which gives it the
same flat tensor inputs the opaque node has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

from trainplan.passes.standins import ScalarStandIn

OpaqueKind = Literal["block", "leaf"]


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Shape, dtype and grad requirement of a tensor seen while tracing."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorMeta":
        return cls(tuple(int(s) for s in t.shape), t.dtype, bool(t.requires_grad))

    def empty(self, requires_grad: bool | None = None) -> torch.Tensor:
        """A meta tensor of this shape (a leaf requiring grad where it did, if floating)."""
        t = torch.empty(self.shape, dtype=self.dtype, device="meta")
        want = self.requires_grad if requires_grad is None else requires_grad
        return t.requires_grad_() if want and (t.is_floating_point() or t.is_complex()) else t

    def encode(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}[{','.join(map(str, self.shape))}]"


def _leaf_meta(leaf: Any) -> Any:
    return TensorMeta.of(leaf) if isinstance(leaf, torch.Tensor) else leaf


def _describe(leaf: Any) -> str:
    if isinstance(leaf, TensorMeta):
        return leaf.encode()
    if isinstance(leaf, (bool, int, float, str, type(None), torch.dtype, torch.device)):
        return repr(leaf)
    return type(leaf).__qualname__


@dataclass(frozen=True)
class CallRecord:
    """One call of a module kept whole: its flattened inputs and outputs (tensors as TensorMeta).

    ``key`` identifies the block type: the module's structural signature plus the input
    signature; calls with equal keys trace to the same graph.
    """

    path: str
    kind: OpaqueKind
    module: nn.Module
    key: str
    in_spec: pytree.TreeSpec
    in_leaves: tuple[Any, ...]
    out_spec: pytree.TreeSpec
    out_leaves: tuple[Any, ...]

    @property
    def tensor_inputs(self) -> tuple[TensorMeta, ...]:
        return tuple(x for x in self.in_leaves if isinstance(x, TensorMeta))

    @property
    def tensor_outputs(self) -> tuple[TensorMeta, ...]:
        return tuple(x for x in self.out_leaves if isinstance(x, TensorMeta))

    def call_args(self, tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the call with ``tensors`` in the tensor slots."""
        it = iter(tensors)
        leaves = [next(it) if isinstance(x, TensorMeta) else x for x in self.in_leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.in_spec)
        return tuple(args), dict(kwargs)

    def outputs(self, tensors: list[torch.Tensor]) -> Any:
        it = iter(tensors)
        leaves = [next(it) if isinstance(x, TensorMeta) else x for x in self.out_leaves]
        return pytree.tree_unflatten(leaves, self.out_spec)


def call_key(signature: str, in_spec: pytree.TreeSpec, in_leaves: tuple[Any, ...]) -> str:
    text = "|".join([signature, str(in_spec), *(_describe(x) for x in in_leaves)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten_call(args: tuple, kwargs: dict) -> tuple[pytree.TreeSpec, tuple[Any, ...], list[torch.Tensor]]:
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    return spec, tuple(_leaf_meta(x) for x in leaves), [x for x in leaves if isinstance(x, torch.Tensor)]


def _empty_outputs(inputs: list[torch.Tensor], outputs: str) -> list[torch.Tensor]:
    device = inputs[0].device if inputs else torch.device("meta")
    result = []
    for item in filter(None, outputs.split(";")):
        dtype_name, _, dims = item.rstrip("]").partition("[")
        shape = [int(d) for d in dims.split(",") if d]
        result.append(torch.empty(shape, dtype=getattr(torch, dtype_name), device=device))
    return result


@torch.library.custom_op("trainplan::opaque_module", mutates_args=())
def opaque_module(inputs: list[torch.Tensor], call: str, outputs: str) -> list[torch.Tensor]:
    """A module kept whole: empty tensors of the shapes ``outputs`` encodes (``float32[1,8];...``).

    ``call`` names the :class:`CallRecord` of the capture that holds the module and its inputs.
    """
    return _empty_outputs(inputs, outputs)


@opaque_module.register_fake
def _opaque_module_fake(inputs: list[torch.Tensor], call: str, outputs: str) -> list[torch.Tensor]:
    return _empty_outputs(inputs, outputs)


OPAQUE_OP = torch.ops.trainplan.opaque_module.default


class OpaqueModule(nn.Module):
    """Stands in for ``inner`` during ``torch.export``; see the module docstring.

    ``inner`` is deliberately not a registered submodule, so export does not lift its parameters
    into the outer graph; its shape run binds fake copies of them instead. ``shapes`` (input key →
    outputs) and ``records`` (call id → CallRecord) belong to one capture and are shared by all
    stand-ins of that capture, so each block type runs once.
    """

    def __init__(self, inner: nn.Module, path: str, kind: OpaqueKind, signature: str,
                 shapes: dict[str, tuple], records: dict[str, CallRecord]) -> None:
        super().__init__()
        self.__dict__["inner"] = inner
        self.path, self.kind, self.signature = path, kind, signature
        self.shapes, self.records = shapes, records

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        in_spec, in_leaves, tensors = flatten_call(args, kwargs)
        key = call_key(self.signature, in_spec, in_leaves)
        if key not in self.shapes:
            self.shapes[key] = self._shape_run(args, kwargs)
        out_spec, out_leaves = self.shapes[key]
        call_id = f"{self.path}|{key}"
        self.records.setdefault(call_id, CallRecord(self.path, self.kind, self.inner, key, in_spec, in_leaves,
                                                    out_spec, out_leaves))
        encoded = ";".join(x.encode() for x in out_leaves if isinstance(x, TensorMeta))
        return self.records[call_id].outputs(list(opaque_module(tensors, call_id, encoded)))

    def _shape_run(self, args: tuple, kwargs: dict) -> tuple[pytree.TreeSpec, tuple[Any, ...]]:
        """Outputs of ``inner`` on the (fake) inputs, computed without being traced."""
        fake_mode = torch._guards.detect_fake_mode((args, kwargs))
        with disable_proxy_modes_tracing(), ScalarStandIn():
            state = {name: fake_mode.from_tensor(t, static_shapes=True) if fake_mode else t
                     for name, t in [*self.inner.named_parameters(), *self.inner.named_buffers()]}
            out = torch.func.functional_call(self.inner, state, args, kwargs)
        out_leaves, out_spec = pytree.tree_flatten(out)
        return out_spec, tuple(_leaf_meta(x) for x in out_leaves)


class FlatCall(nn.Module):
    """Calls ``module`` with a recorded call's arguments, taking only the tensors as one list.

    Tracing this gives a graph whose inputs are exactly the tensor inputs of the opaque node.
    """

    def __init__(self, module: nn.Module, in_spec: pytree.TreeSpec, in_leaves: tuple[Any, ...]) -> None:
        super().__init__()
        self.m = module
        self.in_spec, self.in_leaves = in_spec, in_leaves

    def forward(self, tensors: list[torch.Tensor]) -> Any:
        leaves, k = [], 0
        for slot in self.in_leaves:
            if isinstance(slot, TensorMeta):
                leaves.append(tensors[k])
                k += 1
            else:
                leaves.append(slot)
        args, kwargs = pytree.tree_unflatten(leaves, self.in_spec)
        return self.m(*args, **kwargs)


@contextmanager
def swapped(root: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[None]:
    """Temporarily put ``replacements`` (module path → module) into ``root``; always restored."""
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, new in replacements.items():
            parent_path, _, name = path.rpartition(".")
            parent = root.get_submodule(parent_path)
            saved.append((parent, name, parent._modules[name]))  # type: ignore[arg-type]
            parent._modules[name] = new
        yield
    finally:
        for parent, name, old in reversed(saved):
            parent._modules[name] = old


@contextmanager
def training(module: nn.Module) -> Iterator[None]:
    """Trace in training mode (dropout, batch statistics); the previous modes are restored."""
    modes = {name: m.training for name, m in module.named_modules()}
    module.train(True)
    try:
        yield
    finally:
        for name, m in module.named_modules():
            m.training = modes.get(name, m.training)
