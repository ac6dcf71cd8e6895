"""Per-operator cost table for ``trainplan calibrate``: fixed and per-unit time of each op, forward and backward.

Why: on a CPU (and for small tensors on any device) a training step is not GEMM FLOPs over a peak
rate. Each eager operator pays a fixed cost (Python, dispatcher, autograd bookkeeping, a parallel
region), transcendental element-wise ops (GeLU's ``erf``, SiLU's ``exp``) are compute-bound far
below memory bandwidth, and small GEMMs run well below the large-GEMM rate. A profile of the laptop
GPT (4 layers, hidden 128, micro-batch 4, 2 threads) spends 13% of its step in ``gelu`` and
``gelu_backward`` at about 2 GB/s, and its mean ``mm`` runs at two thirds of the calibrated
large-GEMM rate. The remedy of operator-level performance models — measure each operator on the
target device and sum over the graph (Qi et al., "PALEO: A Performance Model for Deep Neural
Networks", ICLR 2017, Sec. 3; Geoffrey X. Yu et al., "Habitat", USENIX ATC 2021, Sec. 3, which
scales measured per-op times) — is what this module provides the measurements for.

Each probe runs one operator with autograd on inputs of a few sizes and times the forward and the
backward separately. :func:`fit_linear` fits ``t = fixed + per_unit · units`` per direction by least
squares with both coefficients non-negative, where ``units`` is the op's output elements, or its
FLOPs for matrix products, convolutions and attention (counted by ``torch.utils.flop_counter``, the
counter the graph front end uses, so planner and measurement count alike).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# (forward callable, tensors that receive gradients); the callable returns one tensor.
Case = tuple[Callable[[], torch.Tensor], list[torch.Tensor]]
Probe = Callable[[int, torch.device, torch.dtype], Case]

HIDDEN = 128  # row width of the norm / embedding / softmax probes (the per-element cost barely depends on it)


def _leaf(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return (torch.rand(shape, device=device, dtype=dtype) + 0.5).requires_grad_(True)


def _ids(high: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, shape, device=device)


def _rows(n: int) -> int:
    return max(1, n // HIDDEN)


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Probe:
    def probe(n: int, device: torch.device, dtype: torch.dtype) -> Case:
        x = _leaf((_rows(n), HIDDEN), device, dtype)
        return (lambda: fn(x)), [x]

    return probe


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Probe:
    def probe(n: int, device: torch.device, dtype: torch.dtype) -> Case:
        x, y = _leaf((_rows(n), HIDDEN), device, dtype), _leaf((_rows(n), HIDDEN), device, dtype)
        return (lambda: fn(x, y)), [x, y]

    return probe


def _layer_norm(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x, w, b = _leaf((_rows(n), HIDDEN), device, dtype), _leaf((HIDDEN,), device, dtype), _leaf((HIDDEN,), device, dtype)
    return (lambda: F.layer_norm(x, (HIDDEN,), w, b)), [x, w, b]


def _rms_norm(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x, w = _leaf((_rows(n), HIDDEN), device, dtype), _leaf((HIDDEN,), device, dtype)
    return (lambda: F.rms_norm(x, (HIDDEN,), w, 1e-6)), [x, w]


def _batch_norm(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    channels, plane = 16, 64
    x = _leaf((max(1, n // (channels * plane)), channels, 8, 8), device, dtype)
    w, b = _leaf((channels,), device, dtype), _leaf((channels,), device, dtype)
    mean, var = torch.zeros(channels, device=device, dtype=dtype), torch.ones(channels, device=device, dtype=dtype)
    return (lambda: F.batch_norm(x, mean, var, w, b, training=True)), [x, w, b]


def _embedding(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    table = _leaf((512, HIDDEN), device, dtype)
    ids = _ids(512, (_rows(n),), device)
    return (lambda: F.embedding(ids, table)), [table]


def _cross_entropy(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    logits = _leaf((_rows(n), HIDDEN), device, dtype)
    target = _ids(HIDDEN, (_rows(n),), device)
    return (lambda: F.cross_entropy(logits, target)), [logits]


def _cat(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x, y = _leaf((_rows(n), HIDDEN // 2), device, dtype), _leaf((_rows(n), HIDDEN // 2), device, dtype)
    return (lambda: torch.cat([x, y], dim=-1)), [x, y]


def _add_(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x, y = _leaf((_rows(n), HIDDEN), device, dtype), _leaf((_rows(n), HIDDEN), device, dtype)
    return (lambda: (x * 1).add_(y)), [x, y]


def _pool(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x = _leaf((max(1, n // 16), 16, 4, 4), device, dtype)  # n output elements, 16 inputs each
    return (lambda: F.adaptive_avg_pool2d(x, 1)), [x]


def _view(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x = _leaf((_rows(n), HIDDEN), device, dtype)
    return (lambda: x.transpose(0, 1)), [x]


class _Call(torch.nn.Module):
    """A module whose forward reads its weight and bias and returns its input: one
    ``nn.Module.__call__``, one Python frame and two parameter look-ups (``Module.__getattr__``,
    about 1 us each on a CPU), what a typical module adds on top of the operators it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.weight is not None and self.bias is not None else -x


def _module_call(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x = _leaf((_rows(n), HIDDEN), device, dtype)
    call = _Call()
    return (lambda: call(x)), [x]


def _linear(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    # (1, m, k) @ (k, k) + bias with m = n / k, a (batch, sequence, hidden) input as models feed it.
    k = HIDDEN
    x, w, b = _leaf((1, max(1, n // k), k), device, dtype), _leaf((k, k), device, dtype), _leaf((k,), device, dtype)
    return (lambda: F.linear(x, w, b)), [x, w, b]


def _sdpa(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    seq = max(8, min(256, int(math.sqrt(n))))
    heads, head_dim = 4, 32
    q, k, v = (_leaf((1, heads, seq, head_dim), device, dtype) for _ in range(3))
    return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), [q, k, v]


def _conv2d(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    channels = 16
    side = max(4, int(math.sqrt(n / channels)))
    x = _leaf((1, channels, side, side), device, dtype)
    w, b = _leaf((channels, channels, 3, 3), device, dtype), _leaf((channels,), device, dtype)
    return (lambda: F.conv2d(x, w, b, padding=1)), [x, w, b]


# Operators timed per output element, named as the graph front end records them
# (trainplan.planner.model_costs._op_name): aten names, functions, tensor methods; a string
# argument that selects another kernel is part of the name ('gelu[approximate=tanh]').
ELEMENTWISE_PROBES: dict[str, Probe] = {
    "add": _binary(torch.add), "sub": _binary(torch.sub), "mul": _binary(torch.mul), "div": _binary(torch.div),
    "add_": _add_, "neg": _unary(torch.neg), "pow": _unary(lambda x: x.pow(2)), "reciprocal": _unary(torch.reciprocal),
    "rsqrt": _unary(torch.rsqrt), "exp": _unary(torch.exp), "cos": _unary(torch.cos), "sin": _unary(torch.sin),
    "tanh": _unary(torch.tanh), "relu": _unary(F.relu), "gelu": _unary(F.gelu),
    "gelu[approximate=tanh]": _unary(lambda x: F.gelu(x, approximate="tanh")), "silu": _unary(F.silu),
    "softmax": _unary(lambda x: F.softmax(x, -1)), "dropout": _unary(lambda x: F.dropout(x, 0.0, True)),
    "to": _unary(lambda x: x.to(torch.float64)), "layer_norm": _layer_norm, "rms_norm": _rms_norm,
    "batch_norm": _batch_norm, "embedding": _embedding, "cross_entropy": _cross_entropy, "cat": _cat,
    "adaptive_avg_pool2d": _pool, "view": _view, "module_call": _module_call,
}
# Operators timed per FLOP (their work grows faster than their output).
FLOP_PROBES: dict[str, Probe] = {"linear": _linear, "scaled_dot_product_attention": _sdpa, "conv2d": _conv2d}

# Sizes (output elements, or the n the FLOP probes scale with) spanning small models' tensors.
SIZES = (1 << 10, 1 << 14, 1 << 17)
QUICK_SIZES = (1 << 10, 1 << 16)


@dataclass(frozen=True, slots=True)
class OpTiming:
    """One probe at one size: units (output elements or FLOPs), forward and backward seconds."""

    op: str
    units: float
    fwd_s: float
    bwd_s: float


def _flops(fn: Callable[[], torch.Tensor]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CHAIN = 8  # calls per timed batch: the difference to one call removes the harness and autograd-engine start


def time_probe(op: str, probe: Probe, n: int, device: torch.device, dtype: torch.dtype, *,
               per_flop: bool, rounds: int = 3, repeats: int = 5) -> OpTiming:
    """Forward and backward seconds of one call of ``probe`` at size ``n``.

    ``CHAIN`` calls run back to back and their outputs go to one ``torch.autograd.backward``, as a
    model's ops do; one call alone is also timed and ``(t_chain - t_one) / (CHAIN - 1)`` is the op's
    cost, so the timer, the Python loop and the autograd engine's start of each backward (about
    15 us on a CPU, paid once per model backward, not per op) are not charged to the op. Each
    figure is the smallest of ``rounds`` medians of ``repeats`` (after warm-up), so that a burst of
    another process's work on a shared machine does not become an op's cost.
    """
    fn, leaves = probe(n, device, dtype)
    out = fn()
    # FLOPs on meta tensors, as the graph front end counts them: on a CPU, attention runs a fused
    # kernel the flop counter does not know, while its meta path is counted.
    units = _flops(probe(n, torch.device("meta"), dtype)[0]) if per_flop else float(out.numel())
    grad = torch.ones_like(out)

    def timed(calls: int) -> tuple[float, float]:
        for leaf in leaves:
            leaf.grad = None
        _sync(device)
        t0 = time.perf_counter()
        outs = [fn() for _ in range(calls)]
        _sync(device)
        t1 = time.perf_counter()
        torch.autograd.backward(outs, [grad] * calls)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    def best(calls: int) -> tuple[float, float]:
        timed(calls), timed(calls)
        fwd, bwd = [], []
        for _ in range(rounds):
            runs = [timed(calls) for _ in range(repeats)]
            fwd.append(statistics.median(r[0] for r in runs))
            bwd.append(statistics.median(r[1] for r in runs))
        return min(fwd), min(bwd)

    one, chain = best(1), best(CHAIN)
    per_call = [max(0.0, (c - o) / (CHAIN - 1)) for o, c in zip(one, chain)]
    return OpTiming(op, units, per_call[0], per_call[1])


# The optimizers the runtime builds (trainplan.runtime.data_parallel.optimizer_class), default settings.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
}
TENSORS = 8  # parameter tensors per timed update


def time_optimizer(name: str, n: int, device: torch.device, dtype: torch.dtype, *, rounds: int = 3,
                   repeats: int = 5) -> OpTiming:
    """Seconds of one ``optimizer.step()`` per parameter tensor of ``n`` elements, as ``OpTiming``
    (op ``optimizer:NAME``, units = elements, the update in ``fwd_s``, ``bwd_s`` 0).

    On a CPU torch's optimizers run one tensor at a time (its multi-tensor ``foreach`` path is for
    GPUs), about ten element-wise kernels per tensor for Adam: the fixed cost per tensor, not the
    bytes, dominates a small model's update (68 tensors of the 4-layer hidden-64 GPT: 1.9 ms, where
    24 bytes per parameter over the memory bandwidth say 0.09 ms).
    """
    params = [torch.zeros(n, device=device, dtype=dtype, requires_grad=True) for _ in range(TENSORS)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = OPTIMIZERS[name](params, lr=1e-3)

    def step() -> float:
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    step(), step()
    best = min(statistics.median(step() for _ in range(repeats)) for _ in range(rounds))
    return OpTiming(f"optimizer:{name}", float(n), best / TENSORS, 0.0)


def time_all(device: torch.device, dtype: torch.dtype, quick: bool) -> list[OpTiming]:
    """Every probe at every size; the order is fixed so that all ranks run the same ops together."""
    sizes = QUICK_SIZES if quick else SIZES
    rounds, repeats = (2, 3) if quick else (3, 5)
    out = []
    for per_flop, probes in ((False, ELEMENTWISE_PROBES), (True, FLOP_PROBES)):
        for op, probe in probes.items():
            out += [time_probe(op, probe, n, device, dtype, per_flop=per_flop, rounds=rounds, repeats=repeats)
                    for n in sizes]
    for name in OPTIMIZERS:
        out += [time_optimizer(name, n, device, dtype, rounds=rounds, repeats=repeats) for n in sizes]
    return out


def fit_linear(units: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``seconds ≈ fixed + per_unit · units`` with ``fixed, per_unit >= 0``.

    Unconstrained first; if a coefficient comes out negative (noise on a nearly flat or nearly
    proportional curve) it is pinned to 0 and the other refitted alone.
    """
    if len(units) != len(seconds) or not units:
        raise ValueError("fit_linear needs as many times as sizes, at least one")
    n = len(units)
    mean_u, mean_s = sum(units) / n, sum(seconds) / n
    var = sum((u - mean_u) ** 2 for u in units)
    slope = sum((u - mean_u) * (s - mean_s) for u, s in zip(units, seconds)) / var if var > 0 else 0.0
    fixed = mean_s - slope * mean_u
    if slope < 0:
        return max(0.0, mean_s), 0.0
    if fixed < 0:
        return 0.0, sum(u * s for u, s in zip(units, seconds)) / sum(u * u for u in units)
    return fixed, slope


def fit_op_costs(timings: list[OpTiming]) -> dict[str, dict[str, float]]:
    """``{op: {fwd_fixed_s, fwd_per_unit_s, bwd_fixed_s, bwd_per_unit_s, per}}`` from the timings."""
    by_op: dict[str, list[OpTiming]] = {}
    for t in timings:
        by_op.setdefault(t.op, []).append(t)
    out = {}
    for op, rows in by_op.items():
        units = [r.units for r in rows]
        ff, fu = fit_linear(units, [r.fwd_s for r in rows])
        bf, bu = fit_linear(units, [r.bwd_s for r in rows])
        out[op] = {"per": "flop" if op in FLOP_PROBES else "element",
                   "fwd_fixed_s": ff, "fwd_per_unit_s": fu, "bwd_fixed_s": bf, "bwd_per_unit_s": bu}
    return out
