"""Activation recomputation (``plan.recompute``) with ``torch.utils.checkpoint``.

* ``full``: every block (element of a ``ModuleList``: a transformer layer, an MLP layer) keeps only
  its input and recomputes the rest of its forward pass during backward (Chen et al. 2016).
* ``selective``: every block recomputes the attention core — softmax(QK^T)V, the
  ``scaled_dot_product_attention`` kernels and softmax — and keeps what the rest of its backward
  needs (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  §4.3), with torch's selective activation checkpointing: the outputs of the matrix products, the
  LayerNorm/RMSNorm kernels, the activation functions and the collectives are saved
  (``SAVED_OPS``); the cheap ops between them (views, element-wise arithmetic, the decomposed
  parts of norms) are recomputed from those, which costs no matrix product. Blocks without
  attention (MLP, CNN) then recompute only element-wise ops.
* ``none``: nothing is recomputed.

Why not "save every op except the attention core": torch's cache then keeps the output of every
op, including the many autograd itself would free (residual sums, transposed copies, the rotary
and grouped-query intermediates): 2.6x the bytes of no recomputation for the catalogue GPT and
3.6x the planner's selective estimate for llama (measured per layer, docs/accuracy.md).

The wrapper replaces the block's ``forward`` on the instance, so parameter names (which the
initialisation and the tensor-parallel plan are keyed by) do not change, and FSDP hooks, which
run around ``__call__``, stay outside the checkpointed region.

In-place ops under ``selective``: an in-place op that writes into a saved output (a model's
``y = linear(x); y.add_(b)``) must not run again when recomputing (it would apply twice), so it
is "saved" too and replayed from the cache, which then holds the written value (hence
``allow_cache_entry_mutation=True``: torch's default check refuses any write into a cache entry,
"Tensor cached during selective activation checkpoint has been mutated"). That is exact unless an
op that is recomputed read that tensor before the write — it would read the written value when
recomputed — which the policy detects during the forward pass and refuses with an error.
In-place ops on recomputed tensors (``nn.RMSNorm``'s ``mean(x^2).add_(eps)``) are recomputed in
order like their inputs. Random ops are recomputed (none is saved), so the checkpoint's restored
RNG state gives them the same values as in the forward pass.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from trainplan.ir.spec import Recompute
from trainplan.runtime.structure import present

_aten = torch.ops.aten
# The attention core, which ``selective`` recomputes (none of these may be in SAVED_OPS).
ATTENTION_CORE = frozenset(
    op
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_softmax",
    )
    if hasattr(_aten, name)
    for op in [getattr(_aten, name).default]
)


def _tensors(values: Any) -> list[torch.Tensor]:
    flat = values if isinstance(values, (list, tuple)) else [values]
    return [v for v in flat if isinstance(v, torch.Tensor)]


def _written_args(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an in-place / out= op writes into (its schema marks them ``Tensor(a!)``)."""
    written = []
    for i, arg in enumerate(op._schema.arguments):  # positional first, then keyword-only
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = kwargs[arg.name] if arg.name in kwargs else args[i] if i < len(args) else None
        written += _tensors(value)
    return written


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        return None


def _ops(namespace: Any, names: tuple[str, ...]) -> frozenset[Any]:
    return frozenset(getattr(namespace, n).default for n in names if hasattr(namespace, n))


SAVED_OPS = _ops(_aten, ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "convolution",
                         "native_layer_norm", "_fused_rms_norm", "native_group_norm",
                         "gelu", "silu", "relu", "mish")) | _ops(
    torch.ops._c10d_functional, ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor",
                                 "all_to_all_single", "wait_tensor"))
if SAVED_OPS & ATTENTION_CORE:  # the attention core is what selective recomputation recomputes
    raise RuntimeError(f"internal error: attention-core ops marked as saved: {SAVED_OPS & ATTENTION_CORE}")


class AttentionCorePolicy:
    """Selective checkpointing policy of one checkpointed call (module docstring): save ``SAVED_OPS``'
    outputs and in-place writes into them, recompute the rest (the attention core among it), refuse
    a write into a saved tensor that a recomputed op had already read."""

    def __init__(self, observer: Callable[[torch.Tensor], Any] | None = None) -> None:
        self.saved: set[int] = set()  # storages of the outputs the cache holds
        self.read_by_recomputed: set[int] = set()  # storages the recomputed ops read
        self.observer = observer  # the measurement's (see observe_saved_outputs)
        self.held: list[Any] = []  # what the observer returned for each saved output

    def release_with(self, output: Any) -> None:
        """Let the observer's records go when backward reaches ``output`` (the block's last op: its
        recomputation, which consumes the cache, follows), or now if nothing will be backpropagated."""
        if not self.held:
            return
        anchors = [t for t in _tensors(output) if t.grad_fn is not None]
        if not anchors:
            self.held = []
            return
        anchors[0].grad_fn.register_hook(lambda *_: self.held.clear())

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        schema = getattr(op, "_schema", None)
        mutable = schema is not None and schema.is_mutable
        written = {_storage_ptr(t) for t in _written_args(op, args, kwargs)} if mutable else set()
        into_saved = written & self.saved
        if into_saved & self.read_by_recomputed:
            raise RuntimeError(
                f"recompute: selective cannot recompute this block: {op} writes in place into a saved tensor "
                "that a recomputed op (the attention core or an element-wise op) read before, so recomputing "
                "it in backward would read the written value; make that op out-of-place or use recompute: full")
        if op in SAVED_OPS or into_saved:
            for t in _tensors(ctx.op_output):
                ptr = _storage_ptr(t)
                if ptr is not None:
                    self.saved.add(ptr)
                    if self.observer is not None:
                        self.held.append(self.observer(t))
            return CheckpointPolicy.MUST_SAVE
        for t in _tensors(list(args) + list(kwargs.values())):
            ptr = _storage_ptr(t)
            if ptr is not None:
                self.read_by_recomputed.add(ptr)
        return CheckpointPolicy.PREFER_RECOMPUTE


_observer: list[Callable[[torch.Tensor], Any]] = []


@contextlib.contextmanager
def observe_saved_outputs(observer: Callable[[torch.Tensor], Any]) -> Iterator[None]:
    """While active, selective checkpointing calls ``observer`` with every output it caches and keeps
    what it returns until backward reaches the block (then the cache is consumed). The measurement
    (:mod:`trainplan.runtime.measure`) counts them with the activations: the cache holds them
    instead of autograd's saved-tensor hooks, which never see them."""
    _observer.append(observer)
    try:
        yield
    finally:
        _observer.remove(observer)


def checkpoint_forward(module: nn.Module, selective: bool = False) -> None:
    """Make ``module`` recompute its forward in backward (non-reentrant ``torch.utils.checkpoint``);
    ``selective``: only what :class:`AttentionCorePolicy` does not save."""
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not selective:
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        # A fresh policy per call: its record is one forward pass of one block.
        policy = AttentionCorePolicy(_observer[-1] if _observer else None)
        out = checkpoint(inner, *args, use_reentrant=False, context_fn=lambda: create_selective_checkpoint_contexts(
            policy, allow_cache_entry_mutation=True), **kwargs)
        policy.release_with(out)
        return out

    module.forward = forward  # type: ignore[method-assign]


def apply_recompute(module: nn.Module, mode: Recompute, blocks: list[str]) -> int:
    """Apply ``mode`` to the blocks of the whole model that ``module`` holds; returns how many."""
    if mode == "none":
        return 0
    local = present(module, blocks)
    for path in local:
        checkpoint_forward(module.get_submodule(path), selective=mode == "selective")
    return len(local)
