"""Activation recomputation (``plan.recompute``) with ``torch.utils.checkpoint``.

* ``full``: every block (element of a ``ModuleList``: a transformer layer, an MLP layer) keeps only
  its input and recomputes the rest of its forward pass during backward (Chen et al. 2016).
* ``selective``: every block saves everything except the attention core — softmax(QK^T)V, the
  ``scaled_dot_product_attention`` kernels and softmax — which is recomputed (Korthikanti et al.
  2022, "Reducing Activation Recomputation in Large Transformer Models", §4.3), using torch's
  selective activation checkpointing. Blocks without attention (MLP, CNN) then save everything.
* ``none``: nothing is recomputed.

The wrapper replaces the block's ``forward`` on the instance, so parameter names (which the
initialisation and the tensor-parallel plan are keyed by) do not change, and FSDP hooks, which
run around ``__call__``, stay outside the checkpointed region.

In-place ops under ``selective``: torch's own composites write into outputs of ops the policy
saves (``nn.RMSNorm`` computes ``mean(x^2).add_(eps)``), which torch's cache refuses by default
("Tensor cached during selective activation checkpoint has been mutated"). Because every op
outside the attention core is saved, in-place ops included, the recomputation replays the
in-place op from the cache as well (it does not run it again), so a mutated cache entry holds
exactly the value the forward pass went on with; the only ops that run again are the attention
core's, and those would be wrong if an input they read had been written after they read it.
The policy checks exactly that during the forward pass and raises, so the cache may allow
mutation (``allow_cache_entry_mutation=True``) without ever computing a different gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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


class AttentionCorePolicy:
    """Selective checkpointing policy of one checkpointed call: recompute the attention core, save
    every other op's output — and refuse a forward pass that writes in place into a tensor the
    attention core read, whose recomputation would then read the written value (module docstring)."""

    def __init__(self) -> None:
        self.read_by_recomputed: set[int] = set()  # storages the recomputed ops read

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op in ATTENTION_CORE:
            for t in _tensors(list(args) + list(kwargs.values())):
                ptr = _storage_ptr(t)
                if ptr is not None:
                    self.read_by_recomputed.add(ptr)
            return CheckpointPolicy.PREFER_RECOMPUTE
        schema = getattr(op, "_schema", None)
        if schema is not None and schema.is_mutable and self.read_by_recomputed:
            for t in _written_args(op, args, kwargs):
                if _storage_ptr(t) in self.read_by_recomputed:
                    raise RuntimeError(
                        f"recompute: selective cannot recompute the attention core of this block: {op} writes in "
                        "place into a tensor the attention core read, so recomputing it in backward would read "
                        "the written value; make that op out-of-place or use recompute: full")
        return CheckpointPolicy.MUST_SAVE


def _selective_context() -> Any:
    # A fresh policy per checkpointed call (its record is per forward pass of one block).
    return create_selective_checkpoint_contexts(AttentionCorePolicy(), allow_cache_entry_mutation=True)


def checkpoint_forward(module: nn.Module, context_fn: Callable[[], Any] | None = None) -> None:
    """Make ``module`` recompute its forward in backward (non-reentrant ``torch.utils.checkpoint``)."""
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if context_fn is None:
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    module.forward = forward  # type: ignore[method-assign]


def apply_recompute(module: nn.Module, mode: Recompute, blocks: list[str]) -> int:
    """Apply ``mode`` to the blocks of the whole model that ``module`` holds; returns how many."""
    if mode == "none":
        return 0
    local = present(module, blocks)
    for path in local:
        checkpoint_forward(module.get_submodule(path), _selective_context if mode == "selective" else None)
    return len(local)
