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
from collections.abc import Callable, Sequence
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


def _act(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An activation: a non-leaf tensor (a view of a leaf), as every op inside a model receives.

    Feeding leaves instead would charge each op's backward an ``AccumulateGrad`` per input (a few us
    on a CPU, most of an element-wise op's backward), which ops inside a model do not pay; here the
    gradients of the timed calls sum into the view's buffer once, as a tensor read twice does.
    """
    leaf = _leaf(shape, device, dtype)
    return leaf.view(shape)


def _ids(high: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, shape, device=device)


def _rows(n: int) -> int:
    return max(1, n // HIDDEN)


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Probe:
    def probe(n: int, device: torch.device, dtype: torch.dtype) -> Case:
        x = _act((_rows(n), HIDDEN), device, dtype)
        return (lambda: fn(x)), [x]

    return probe


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Probe:
    def probe(n: int, device: torch.device, dtype: torch.dtype) -> Case:
        x, y = _act((_rows(n), HIDDEN), device, dtype), _act((_rows(n), HIDDEN), device, dtype)
        return (lambda: fn(x, y)), [x, y]

    return probe


def _layer_norm(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x, w, b = _act((_rows(n), HIDDEN), device, dtype), _leaf((HIDDEN,), device, dtype), _leaf((HIDDEN,), device, dtype)
    return (lambda: F.layer_norm(x, (HIDDEN,), w, b)), [x, w, b]


def _rms_norm(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x, w = _act((_rows(n), HIDDEN), device, dtype), _leaf((HIDDEN,), device, dtype)
    return (lambda: F.rms_norm(x, (HIDDEN,), w, 1e-6)), [x, w]


def _batch_norm(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    channels, plane = 16, 64
    x = _act((max(1, n // (channels * plane)), channels, 8, 8), device, dtype)
    w, b = _leaf((channels,), device, dtype), _leaf((channels,), device, dtype)
    mean, var = torch.zeros(channels, device=device, dtype=dtype), torch.ones(channels, device=device, dtype=dtype)
    return (lambda: F.batch_norm(x, mean, var, w, b, training=True)), [x, w, b]


def _embedding(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    table = _leaf((512, HIDDEN), device, dtype)
    ids = _ids(512, (_rows(n),), device)
    return (lambda: F.embedding(ids, table)), [table]


def _cross_entropy(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    logits = _act((_rows(n), HIDDEN), device, dtype)
    target = _ids(HIDDEN, (_rows(n),), device)
    return (lambda: F.cross_entropy(logits, target)), [logits]


def _cat(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x, y = _act((_rows(n), HIDDEN // 2), device, dtype), _act((_rows(n), HIDDEN // 2), device, dtype)
    return (lambda: torch.cat([x, y], dim=-1)), [x, y]


def _add_(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x, y = _act((_rows(n), HIDDEN), device, dtype), _act((_rows(n), HIDDEN), device, dtype)
    return (lambda: (x * 1).add_(y)), [x, y]


def _pool(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x = _act((max(1, n // 16), 16, 4, 4), device, dtype)  # n output elements, 16 inputs each
    return (lambda: F.adaptive_avg_pool2d(x, 1)), [x]


def _view(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x = _act((_rows(n), HIDDEN), device, dtype)
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
    x, w, b = _act((1, max(1, n // k), k), device, dtype), _leaf((k, k), device, dtype), _leaf((k,), device, dtype)
    return (lambda: F.linear(x, w, b)), [x, w, b]


def _sdpa(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    seq = max(8, min(256, int(math.sqrt(n))))
    heads, head_dim = 4, 32
    q, k, v = (_act((1, heads, seq, head_dim), device, dtype) for _ in range(3))
    return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), [q, k, v]


def _conv2d(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    # Two samples: on a CPU, torch runs every 3x3 convolution of a batch of two or more through
    # oneDNN (trainplan.passes.interpret._conv_variant); one sample may take its native kernel instead.
    batch, channels = 2, 16
    side = max(4, int(math.sqrt(n / (batch * channels))))
    x = _act((batch, channels, side, side), device, dtype)
    w, b = _leaf((channels, channels, 3, 3), device, dtype), _leaf((channels,), device, dtype)
    return (lambda: F.conv2d(x, w, b, padding=1)), [x, w, b]


# (channels, side) of a CIFAR ResNet's stages (He et al. 2016, Sec. 4.2: 16, 32 and 64 filters on 32,
# 16 and 8 px maps), inputs small enough (at most 20480 elements,
# trainplan.passes.interpret.NATIVE_CONV_MAX_INPUT) that torch convolves one sample natively.
NATIVE_CONV_STAGES = ((16, 32), (32, 16), (64, 8))


def _conv2d_native(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    # The smallest n: 16 channels on 8 x 8, where the fixed cost is most of the time; larger n: a
    # stage of NATIVE_CONV_STAGES (the same FLOPs each). Torch's im2col + GEMM kernel is far from
    # proportional to FLOPs: at equal FLOPs the 16-channel stage's backward takes about twice the
    # 64-channel one's (its unfolded columns are 4x as many), and a 16 -> 128 channel product is
    # 8x the FLOPs of 16 -> 16 for 1.3x the time; a probe that grew one dimension would fit neither.
    if n < 4096:
        channels, side = 16, 8
    else:
        channels, side = NATIVE_CONV_STAGES[min(2, max(0, round(math.log2(n / 16384) / 1.5)))]
    x = _act((1, channels, side, side), device, dtype)
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
# Operators whose output is a reduction: timed per element of their (first) input, as the planner
# counts them (the loss over the logits, :func:`trainplan.planner.cost.ops.loss_time_s`).
PER_INPUT_ELEMENT = frozenset({"cross_entropy"})
# Operators timed per FLOP (their work grows faster than their output).
FLOP_PROBES: dict[str, Probe] = {"linear": _linear, "scaled_dot_product_attention": _sdpa, "conv2d": _conv2d}
# Per FLOP too, on a CPU in fp32 only: the kernel torch picks there for one sample, where it differs
# (``conv2d[native]``, looked up at a micro-batch of 1, trainplan.planner.cost.ops.lookup).
CPU_FP32_FLOP_PROBES: dict[str, Probe] = {"conv2d[native]": _conv2d_native}


def flop_probes(device: torch.device, dtype: torch.dtype) -> dict[str, Probe]:
    """The per-FLOP probes that apply on ``device`` at ``dtype``."""
    native = device.type == "cpu" and dtype == torch.float32
    return FLOP_PROBES | CPU_FP32_FLOP_PROBES if native else dict(FLOP_PROBES)

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


class _ProbeRun:
    """One probe at one size, ready to time: its call, the gradient to feed back and its units."""

    def __init__(self, op: str, probe: Probe, n: int, device: torch.device, dtype: torch.dtype, per_flop: bool) -> None:
        self.op, self.device = op, device
        self.fn, self.leaves = probe(n, device, dtype)
        out = self.fn()
        # FLOPs on meta tensors, as the graph front end counts them: on a CPU, attention runs a fused
        # kernel the flop counter does not know, while its meta path is counted.
        self.units = _flops(probe(n, torch.device("meta"), dtype)[0]) if per_flop else float(out.numel())
        if op in PER_INPUT_ELEMENT:
            self.units = float(self.leaves[0].numel())
        self.grad = torch.ones_like(out)
        self.best = [math.inf] * 4  # forward and backward of one call, then of CHAIN calls
        self.timed(1), self.timed(CHAIN)  # warm-up

    def timed(self, calls: int) -> tuple[float, float]:
        for leaf in self.leaves:
            if leaf.is_leaf:
                leaf.grad = None
        _sync(self.device)
        t0 = time.perf_counter()
        outs = [self.fn() for _ in range(calls)]
        _sync(self.device)
        t1 = time.perf_counter()
        torch.autograd.backward(outs, [self.grad] * calls)
        _sync(self.device)
        return t1 - t0, time.perf_counter() - t1

    def sample(self, repeats: int) -> None:
        """One round: the median of ``repeats`` timings of one call and of ``CHAIN`` calls; keep the best round."""
        for k, calls in ((0, 1), (2, CHAIN)):
            runs = [self.timed(calls) for _ in range(repeats)]
            self.best[k] = min(self.best[k], statistics.median(r[0] for r in runs))
            self.best[k + 1] = min(self.best[k + 1], statistics.median(r[1] for r in runs))

    def result(self) -> OpTiming:
        fwd = max(0.0, (self.best[2] - self.best[0]) / (CHAIN - 1))
        bwd = max(0.0, (self.best[3] - self.best[1]) / (CHAIN - 1))
        return OpTiming(self.op, self.units, fwd, bwd)


def time_probe(op: str, probe: Probe, n: int, device: torch.device, dtype: torch.dtype, *,
               per_flop: bool, rounds: int = 3, repeats: int = 5) -> OpTiming:
    """Forward and backward seconds of one call of ``probe`` at size ``n``.

    ``CHAIN`` calls run back to back and their outputs go to one ``torch.autograd.backward``, as a
    model's ops do; one call alone is also timed and ``(t_chain - t_one) / (CHAIN - 1)`` is the op's
    cost, so the timer, the Python loop and the autograd engine's start of each backward (about
    15 us on a CPU, paid once per model backward, not per op) are not charged to the op. Each
    figure is the smallest of ``rounds`` medians of ``repeats`` (after warm-up), so that a burst of
    another process's work on a shared machine does not become an op's cost (:func:`time_all`
    interleaves the rounds over all probes, so that one slow second touches one round of each).
    """
    run = _ProbeRun(op, probe, n, device, dtype, per_flop)
    for _ in range(rounds):
        run.sample(repeats)
    return run.result()


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


def time_all(device: torch.device, dtype: torch.dtype, quick: bool,
             networks: Sequence[InSituNetwork] = ()) -> list[OpTiming]:
    """Every probe at every size, then every optimizer; the order is fixed so that all ranks run the
    same ops together. Rounds are interleaved over the probes (see :func:`time_probe`), and each
    round also samples ``networks`` (:func:`in_situ_networks`)."""
    sizes = QUICK_SIZES if quick else SIZES
    rounds, repeats = (2, 3) if quick else (5, 5)
    runs = [_ProbeRun(op, probe, n, device, dtype, per_flop)
            for per_flop, probes in ((False, ELEMENTWISE_PROBES), (True, flop_probes(device, dtype)))
            for op, probe in probes.items() for n in sizes]
    for _ in range(rounds):
        for run in runs:
            run.sample(repeats)
        for network in networks:
            network.sample()
    out = [run.result() for run in runs]
    for name in OPTIMIZERS:
        out += [time_optimizer(name, n, device, dtype, rounds=rounds, repeats=repeats) for n in sizes]
    return out


def fit_linear(units: list[float], seconds: list[float]) -> tuple[float, float]:
    """``seconds ≈ fixed + per_unit · units`` with ``fixed, per_unit >= 0``, least squares in
    *relative* error (each point weighted by ``1 / seconds²``).

    The sizes span two orders of magnitude and more; an absolute fit would let the largest size
    decide both coefficients and leave the smallest, where the fixed cost is most of the time (and
    where small models live), off by half. If a coefficient comes out negative (noise on a nearly
    flat or nearly proportional curve) it is pinned to 0 and the other refitted alone.
    """
    if len(units) != len(seconds) or not units:
        raise ValueError("fit_linear needs as many times as sizes, at least one")
    if max(seconds) <= 1e-15:  # nothing a clock resolves
        return 0.0, 0.0
    floor = max(seconds) * 1e-9  # a zero time (below the clock) weighs as a very small one
    # Divide each equation fixed + per_unit·x = s by s: rows (1/s, x/s) against 1, columns scaled to 1.
    a = [1.0 / max(t, floor) for t in seconds]
    b = [x / max(t, floor) for x, t in zip(units, seconds)]
    ka, kb = max(a), max(b) or 1.0
    a, b = [v / ka for v in a], [v / kb for v in b]
    saa, sab, sbb = sum(v * v for v in a), sum(p * q for p, q in zip(a, b)), sum(v * v for v in b)
    sa, sb = sum(a), sum(b)
    det = saa * sbb - sab * sab
    if det <= 1e-12 * saa * sbb:  # one distinct size: all of it is fixed
        return _only_fixed(a, ka), 0.0
    fixed, slope = (sbb * sa - sab * sb) / det / ka, (saa * sb - sab * sa) / det / kb
    if slope < 0:
        return _only_fixed(a, ka), 0.0
    if fixed < 0:
        return 0.0, sb / sbb / kb
    return fixed, slope


def _only_fixed(a: list[float], scale: float) -> float:
    """The relative least-squares constant: minimises Σ (f·a_i − 1)² over f."""
    return sum(a) / sum(v * v for v in a) / scale


class _SyntheticBlock(torch.nn.Module):
    """A generic network layer for :func:`in_situ_factors`: a norm, two linear layers, GeLU, a
    reshape through views, a SiLU gate, softmax, ReLU and a residual add, each op at its own call
    site (no transformer, no model of the catalogue)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        y = F.gelu(self.up(self.norm(x)))
        # views only (the transposes cancel, so the reshape needs no copy: the graph front end counts
        # reshape as a view)
        y = y.view(x.shape[0], -1, 2, w).transpose(1, 2).transpose(1, 2).reshape(x.shape[0], -1, 2 * w)
        y = self.down(F.silu(y) * y)
        return x + F.relu(torch.softmax(y, -1))


def _synthetic_ops(tokens: int, width: int) -> list[tuple[str, float, bool]]:
    """(table entry, units, has a backward) of one :class:`_SyntheticBlock` call, as the graph front end
    and :mod:`trainplan.planner.op_uses` count them: output elements, FLOPs for the products, views
    (view, two transposes, reshape: the planner's ``view`` entry) and module calls fixed only."""
    s, flops = tokens * width, 2.0 * tokens * width * 2 * width
    return [("module_call", 0, False), ("module_call", 0, False), ("layer_norm", s, True), ("module_call", 0, False),
            ("linear", flops, True), ("gelu", 2 * s, True), ("view", 0, True), ("view", 0, True),
            ("view", 0, True), ("view", 0, True),
            ("silu", 2 * s, True), ("mul", 2 * s, True), ("module_call", 0, False), ("linear", flops, True),
            ("softmax", s, True), ("relu", s, True), ("add", s, True)]


InSitu = dict[str, tuple[float, float]]  # direction ('fwd', 'bwd', 'optimizer') -> (fixed factor, per-unit factor)

# (tokens, width) of the generic network: one size where the fixed costs are most of the time, one
# where the per-element and per-FLOP work is (and the activations outgrow the CPU's L2 cache).
IN_SITU_SIZES = ((32, 64), (512, 256))


def _predicted(fits: dict[str, dict[str, float]], ops: list[tuple[str, float, bool]], direction: str) -> tuple[float, float]:
    rows = [(fits[op], units) for op, units, grad in ops if op in fits and (direction == "fwd" or grad)]
    return (sum(c[f"{direction}_fixed_s"] for c, _ in rows), sum(c[f"{direction}_per_unit_s"] * u for c, u in rows))


def _solve_factors(fixed: tuple[float, float], per_unit: tuple[float, float], measured: tuple[float, float],
                   floor: float) -> tuple[float, float]:
    """``(a, b)`` with ``a·fixed_i + b·per_unit_i = measured_i`` at the two sizes, each at least ``floor``
    (one of them refitted alone when the other would fall below it)."""
    det = fixed[0] * per_unit[1] - fixed[1] * per_unit[0]
    a = (measured[0] * per_unit[1] - measured[1] * per_unit[0]) / det if det else 0.0
    b = (fixed[0] * measured[1] - fixed[1] * measured[0]) / det if det else 0.0
    if a < floor:
        a = floor
        b = max(floor, sum(m - a * f for m, f in zip(measured, fixed)) / sum(per_unit))
    elif b < floor:
        b = floor
        a = max(floor, sum(m - b * u for m, u in zip(measured, per_unit)) / sum(fixed))
    return a, b


def _phases_once(model: torch.nn.Module, x: torch.Tensor, device: torch.device,
                 opt: torch.optim.Optimizer | None) -> list[float]:
    """Seconds of one forward of ``model`` on ``x``, its backward (of ``ones``) and, with ``opt``, the update."""
    _sync(device)
    t0 = time.perf_counter()
    y = model(x)
    _sync(device)
    t1 = time.perf_counter()
    y.backward(torch.ones_like(y))
    _sync(device)
    t2 = time.perf_counter()
    if opt is None:
        return [t1 - t0, t2 - t1]
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    return [t1 - t0, t2 - t1, time.perf_counter() - t2]


def network_phases(model: torch.nn.Module, x: torch.Tensor, device: torch.device,
                   opt: torch.optim.Optimizer | None = None, *, rounds: int, repeats: int) -> list[float]:
    """Seconds of ``model``'s forward on ``x``, its backward (of ``ones``) and, with ``opt``, the update
    after it: per phase the smallest over ``rounds`` of the median of ``repeats`` calls, after two
    warm-up calls."""
    _phases_once(model, x, device, opt), _phases_once(model, x, device, opt)
    best = [math.inf] * (2 if opt is None else 3)
    for _ in range(rounds):
        runs = [_phases_once(model, x, device, opt) for _ in range(repeats)]
        best = [min(b, statistics.median(r[k] for r in runs)) for k, b in enumerate(best)]
    return best


IN_SITU_REPEATS = 7  # calls per round of an :class:`InSituNetwork`


class InSituNetwork:
    """The generic network of :func:`in_situ_factors` (:class:`_SyntheticBlock` × ``blocks``) at one
    size, ready to time in rounds: :func:`time_all` samples it in every round of the operator probes,
    so that a slow spell of a shared machine touches one round of each and the network is timed at
    the table's pace. ``best`` holds forward, backward and Adam update: per phase, the smallest
    round's median of :data:`IN_SITU_REPEATS` calls."""

    def __init__(self, tokens: int, width: int, device: torch.device, dtype: torch.dtype, blocks: int = 4) -> None:
        self.device = device
        self.model = torch.nn.Sequential(*[_SyntheticBlock(width) for _ in range(blocks)]).to(device=device, dtype=dtype)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.Adam(self.params, lr=1e-3)
        self.x = _act((1, tokens, width), device, dtype)
        self.ops = _synthetic_ops(tokens, width) * blocks
        self.best = [math.inf] * 3
        self.once(), self.once()  # warm-up (Adam's state)

    def once(self) -> list[float]:
        return _phases_once(self.model, self.x, self.device, self.opt)

    def sample(self, repeats: int = IN_SITU_REPEATS) -> None:
        runs = [self.once() for _ in range(repeats)]
        self.best = [min(b, statistics.median(r[k] for r in runs)) for k, b in enumerate(self.best)]


def in_situ_networks(device: torch.device, dtype: torch.dtype, blocks: int = 4) -> list[InSituNetwork]:
    """The generic network at each of :data:`IN_SITU_SIZES`, for :func:`time_all` to time and
    :func:`in_situ_factors` to read."""
    return [InSituNetwork(tokens, width, device, dtype, blocks) for tokens, width in IN_SITU_SIZES]


def in_situ_factors(fits: dict[str, dict[str, float]], networks: Sequence[InSituNetwork]) -> InSitu:
    """Factors by which the table's fixed and per-unit costs grow inside a network, per direction.

    The probes time each op in a tight loop of identical calls, where the interpreter, the
    dispatcher and the CPU's caches and branch predictors stay warm for that op and its data. In a
    model every op is a different call site between Python statements and reads activations the
    previous op just wrote: on this project's machine a small op's forward costs 2-5x its
    tight-loop time in a shuffled sequence of all probes, and 1.3-2x in the catalogue GPT (the
    known gap between micro-benchmarks and in-situ cost of operator-level models; PALEO, Qi et al.
    2017, Sec. 4, scales its per-layer predictions by a per-platform factor for the same reason).
    Measured on a generic network (:class:`InSituNetwork`, no model of the catalogue) at the two
    :data:`IN_SITU_SIZES` (``networks``, timed by :func:`time_all` in the rounds of the probes),
    forward, backward and an optimizer update (Adam) of its parameters right after: per direction,
    the fixed factor ``a`` and per-unit factor ``b`` that make ``a·fixed + b·per_unit`` of the
    table's prediction equal the measured time at both sizes (each at least 0.5).

    The network used to be timed in three rounds of its own right after the table, within a second:
    one slow second then doubled the fixed factors (forward 4.2 and backward 1.8 in one
    calibration, 2.1 and 1.0 in the one before it, 2.2-2.6 and 0.9-1.05 in four runs of one
    process alone).
    """
    if len(networks) != 2:
        raise ValueError(f"in_situ_factors needs the network at two sizes, got {len(networks)}")
    adam = fits.get("optimizer:adam", {"fwd_fixed_s": 0.0, "fwd_per_unit_s": 0.0})
    out = {}
    for k, direction in enumerate(("fwd", "bwd", "optimizer")):
        if direction == "optimizer":
            parts = [(len(n.params) * adam["fwd_fixed_s"], sum(p.numel() for p in n.params) * adam["fwd_per_unit_s"])
                     for n in networks]
        else:
            parts = [_predicted(fits, n.ops, direction) for n in networks]
        (f0, u0), (f1, u1) = parts
        out[direction] = _solve_factors((f0, f1), (u0, u1), (networks[0].best[k], networks[1].best[k]), 0.5)
    return out


def apply_in_situ(fits: dict[str, dict[str, float]], factors: InSitu) -> dict[str, dict[str, float]]:
    """``fits`` with each operator's fixed and per-unit costs scaled by the in-situ factors of their
    direction (:func:`in_situ_factors`); optimizer entries by the optimizer's."""
    out = {}
    for op, c in fits.items():
        if op.startswith("optimizer:"):
            a, b = factors.get("optimizer", (1.0, 1.0))
            out[op] = dict(c, fwd_fixed_s=c["fwd_fixed_s"] * a, fwd_per_unit_s=c["fwd_per_unit_s"] * b)
            continue
        (fa, fb), (ba, bb) = factors.get("fwd", (1.0, 1.0)), factors.get("bwd", (1.0, 1.0))
        out[op] = dict(c, fwd_fixed_s=c["fwd_fixed_s"] * fa, fwd_per_unit_s=c["fwd_per_unit_s"] * fb,
                       bwd_fixed_s=c["bwd_fixed_s"] * ba, bwd_per_unit_s=c["bwd_per_unit_s"] * bb)
    return out


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
        out[op] = {"per": "flop" if op in FLOP_PROBES or op in CPU_FP32_FLOP_PROBES else "element",
                   "fwd_fixed_s": ff, "fwd_per_unit_s": fu, "bwd_fixed_s": bf, "bwd_per_unit_s": bu}
    return out
