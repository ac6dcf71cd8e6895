"""Mixed precision: fp32, or bf16/fp16 autocast with fp32 master weights, and fp16 loss scaling.

Parameters, gradients and optimizer state stay fp32; ``torch.autocast`` runs the forward pass (and
the loss) in the compute dtype. fp16 gradients can underflow, so fp16 runs scale the loss by a
dynamic factor (Micikevicius et al. 2018, "Mixed Precision Training", §3.2): gradients are unscaled
before the optimizer step, a step whose gradients hold an inf/NaN on *any* rank is skipped on every
rank (the check is all-reduced, so pipeline stages and replicas stay in lockstep), and the scale
halves after an overflow and doubles after ``growth_interval`` clean steps (torch.amp.GradScaler's
defaults).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from trainplan.ir.spec import Precision

COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def flush_denormals(device: torch.device) -> bool:
    """On CPU, compute with subnormal floats flushed to zero (x86 FTZ/DAZ); True when it took effect.

    A language model that has learnt its data assigns most of the vocabulary probabilities below
    fp32's smallest normal number (1.2e-38), so the softmax's gradient, and every product with it,
    is full of subnormals, which x86 cores process with a microcode assist at a small fraction of
    their normal speed: on this project's laptop GPT the backward pass ran 3.5x slower (53.6 ms
    against 15.4 ms per forward + backward, one process). Flushing changes only values below
    1.2e-38, as TensorFlow does on CPUs by default. The single-process reference run flushes too,
    so a parallel run and its reference still compute the same numbers. GPUs are left alone
    (their math libraries already flush where it matters).
    """
    if device.type != "cpu":
        return False
    return bool(torch.set_flush_denormal(True))


def flushing_denormals() -> bool:
    """Whether this process flushes subnormal floats now (torch offers no getter: test one)."""
    return float(torch.tensor([1e-39], dtype=torch.float32) * 1.0) == 0.0


@contextlib.contextmanager
def denormals_flushed(device: torch.device) -> Iterator[None]:
    """:func:`flush_denormals` for the block, then the previous setting (for runs inside a caller's process)."""
    before = flushing_denormals()
    flush_denormals(device)
    try:
        yield
    finally:
        if device.type == "cpu":
            torch.set_flush_denormal(before)


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=COMPUTE_DTYPE[precision])


def autocast_forward(module: nn.Module, precision: Precision, device: torch.device) -> None:
    """Run ``module``'s forward under autocast (its hooks and wrappers keep working; names unchanged)."""
    if precision == "fp32":
        return
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with autocast(precision, device):
            return inner(*args, **kwargs)

    module.forward = forward  # type: ignore[method-assign]


def autocast_loss(loss_fn: Callable[..., torch.Tensor], precision: Precision, device: torch.device) -> Callable[..., torch.Tensor]:
    """``loss_fn`` computed under autocast, as the standard AMP recipe does."""
    if precision == "fp32":
        return loss_fn

    def loss(*args: Any) -> torch.Tensor:
        with autocast(precision, device):
            return loss_fn(*args)

    return loss


class LossScaler:
    """Dynamic loss scaling for fp16; with ``enabled=False`` (fp32, bf16) every method is the identity."""

    def __init__(
        self, enabled: bool, device: torch.device, *, init_scale: float = 2.0**16, growth_interval: int = 2000
    ) -> None:
        self.enabled = enabled
        self.device = device
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self._clean_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_and_check(self, params: Iterable[torch.Tensor]) -> bool:
        """Divide every local gradient by the scale; True when every rank's gradients are finite."""
        if not self.enabled:
            return True
        finite = True
        for p in params:
            if p.grad is None:
                continue
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            grad.mul_(1.0 / self.scale)
            finite = finite and bool(torch.isfinite(grad).all())
        flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def update(self, finite: bool) -> None:
        """Halve the scale after an overflow; double it after ``growth_interval`` clean steps."""
        if not self.enabled:
            return
        if not finite:
            self.scale /= 2.0
            self._clean_steps = 0
            return
        self._clean_steps += 1
        if self._clean_steps == self.growth_interval:
            self.scale *= 2.0
            self._clean_steps = 0
