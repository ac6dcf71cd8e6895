"""Run one operator (or one module kept whole) on meta tensors and measure what training costs.

* Forward and backward FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around the op and
  around ``torch.autograd.grad`` of its outputs with respect to the inputs that require gradients
  and the parameters it reads (so the first layer of a model fed raw data has no input gradient).
* Tensors saved for backward: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor the
  op's autograd nodes keep.

Inputs that require gradients are passed as clones, so in-place ops are legal on them; the
caller maps each clone to the value it copies (:attr:`Measured.clones`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from trainplan.passes.standins import GpuKernels, ScalarStandIn, flop_counter


@dataclass(frozen=True)
class Measured:
    """Result of one measured call; ``output`` holds detached meta tensors that keep requires_grad."""

    output: Any
    flops_fwd: int
    flops_bwd: int
    saved: tuple[torch.Tensor, ...]
    clones: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (clone passed to the op, original value)


def _wants_grad(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _detach(t: torch.Tensor) -> torch.Tensor:
    out = t.detach()
    return out.requires_grad_() if t.requires_grad else out


def measure(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    params: Sequence[torch.Tensor] = (),
    *,
    whole_module: bool = False,
) -> Measured:
    """Call ``fn(*args, **kwargs)`` on meta tensors and count its training costs.

    ``params`` are parameters the call reads that are not among its arguments (those of a module
    called whole). ``whole_module`` runs it with scalar reads answered by zero and attention
    routed as on GPUs (:mod:`trainplan.passes.standins`).
    """
    clones: list[tuple[torch.Tensor, torch.Tensor]] = []

    def clone(x: torch.Tensor) -> torch.Tensor:
        c = x.clone()
        clones.append((c, x))
        return c

    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if _wants_grad(x)]
    grad_wrt = list({id(x): x for x in [*leaves, *(p for p in params if p.requires_grad)]}.values())
    call_args, call_kwargs = pytree.tree_map_only(torch.Tensor, lambda x: clone(x) if x.requires_grad else x,
                                                  (args, kwargs))
    saved: list[torch.Tensor] = []
    counter = flop_counter()
    with ExitStack() as stack:
        stack.enter_context(counter)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t))
        if whole_module:
            stack.enter_context(ScalarStandIn())
            stack.enter_context(GpuKernels())
        output = fn(*call_args, **call_kwargs)
    flops_fwd = counter.get_total_flops()
    return Measured(pytree.tree_map_only(torch.Tensor, _detach, output), flops_fwd,
                    _backward_flops(output, grad_wrt), tuple(saved), tuple(clones))


def _backward_flops(output: Any, grad_wrt: list[torch.Tensor]) -> int:
    outs = [t for t in pytree.tree_leaves(output) if _wants_grad(t) and t.grad_fn is not None]
    if not outs or not grad_wrt:
        return 0
    grads = [torch.ones_like(t) for t in outs]
    counter = flop_counter()
    with counter:
        torch.autograd.grad(outs, grad_wrt, grads, allow_unused=True)
    return counter.get_total_flops()
