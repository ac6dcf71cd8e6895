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


def _attention_core_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Recompute the attention core, save every other op's output."""
    return CheckpointPolicy.PREFER_RECOMPUTE if op in ATTENTION_CORE else CheckpointPolicy.MUST_SAVE


def _selective_context() -> Any:
    return create_selective_checkpoint_contexts(_attention_core_policy)


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
