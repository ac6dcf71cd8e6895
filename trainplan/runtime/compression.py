"""Gradient compression as DDP communication hooks, composable with the all-reduce algorithms of
:mod:`trainplan.runtime.collectives`, and the bytes each scheme sends per step.

=============  ==============================================================  ====================
compression    what goes on the wire                                           algorithms
=============  ==============================================================  ====================
``none``       the fp32 (or model-dtype) bucket                                all
``fp16``       the bucket cast to fp16 after dividing by ``n`` (no overflow)   all
``bf16``       the bucket cast to bf16 (torch's bf16 hook refuses gloo)        all
``topk``       the ``k`` largest-magnitude entries, as (int32 index, fp32      ``ring`` (our ring
               value) pairs, all-gathered; the rest is kept as error feedback  all-gather), ``native``
``powersgd``   rank-``r`` factors ``P``, ``Q`` per matrix (torch's hook)       ``native``
=============  ==============================================================  ====================

Every hook counts what it sends in ``state.counter`` (measured at each ``isend`` for our algorithms;
for the backend's own collectives, the ring model of the payload it hands over, see
:mod:`trainplan.runtime.collectives.wire`); :func:`wire_bytes_per_step` predicts the same numbers.
"""

# No `from __future__ import annotations` here: DDP's register_comm_hook compares the hook's
# annotations with dist.GradBucket and Future[Tensor] as objects, and refuses strings.

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, get_args

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

from trainplan.ir.spec import Compression
from trainplan.runtime.collectives import registry
from trainplan.runtime.collectives.hooks import (
    AllReduceHookState,
    AsyncHookState,
    CommHook,
    algorithm_options,
    hook_for,
)
from trainplan.runtime.collectives.native import all_gather_native
from trainplan.runtime.collectives.p2p import (
    DEFAULT_TIMEOUT,
    CollectiveError,
    Comm,
    WireCounter,
    group_rank,
    group_size,
    split_views,
)
from trainplan.runtime.collectives.ring import ring_all_gather
from trainplan.runtime.collectives.wire import all_gather_elements_sent, allreduce_elements_sent, ring_elements_sent

COMPRESSIONS: tuple[str, ...] = get_args(Compression)  # the plan's choices
CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOPK_ALGORITHMS = ("ring", "native")
TOPK_BYTES_PER_ENTRY = 8  # an int32 index and an fp32 value


@dataclass(frozen=True)
class CompressionOptions:
    """Knobs of the lossy schemes. ``topk_ratio``: fraction of a bucket's entries sent (0 < k <= 1).
    ``powersgd_rank``: rank of the low-rank factors. ``powersgd_start_iter``: plain all-reduce
    before this step (>= 2: DDP rebuilds its buckets after step 1). ``powersgd_min_compression_rate``:
    a matrix is compressed only if that saves more than this factor (torch's rule)."""

    topk_ratio: float = 0.01
    powersgd_rank: int = 1
    powersgd_start_iter: int = 2
    powersgd_min_compression_rate: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.topk_ratio <= 1:
            raise ValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")
        if self.powersgd_rank < 1:
            raise ValueError(f"powersgd_rank must be a positive integer, got {self.powersgd_rank}")
        if self.powersgd_start_iter < 2:
            raise ValueError("powersgd_start_iter must be at least 2 (error feedback needs DDP's rebuilt buckets), "
                             f"got {self.powersgd_start_iter}")


# ---------------------------------------------------------------- fp16 / bf16 casting


class CastHookState(AllReduceHookState):
    """An all-reduce hook state that sends the bucket in ``dtype``."""

    def __init__(self, dtype: torch.dtype, algo: str, group: dist.ProcessGroup | None, *,
                 timeout: timedelta | None, counter: WireCounter | None, options: dict[str, Any]) -> None:
        super().__init__(algo, group, timeout=timeout, counter=counter, options=options)
        self.dtype = dtype


def cast_hook(state: CastHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Divide by ``n``, cast to fp16/bf16, all-reduce in that dtype, cast back into the bucket.

    Error per element: one rounding of ``g_r / n`` and up to ``n - 1`` of the partial sums, so
    ``|result - mean| <= n·u·Σ_r|g_r|/n`` with ``u = 2**-11`` (fp16) or ``2**-8`` (bf16); fp16 also
    flushes ``|g_r/n| < 2**-24`` to zero (its subnormal limit), bf16 has fp32's range."""
    buffer = bucket.buffer()

    def job() -> torch.Tensor:
        low = buffer.div_(state.size).to(state.dtype)
        state.allreduce(low)
        buffer.copy_(low)
        return buffer

    return state.submit(job)


# ---------------------------------------------------------------- top-k with error feedback


def topk_count(numel: int, ratio: float) -> int:
    """Entries a bucket of ``numel`` sends: ``ceil(ratio·numel)``, at least 1 (0 for an empty one)."""
    return min(numel, max(1, math.ceil(ratio * numel))) if numel else 0


class TopKHookState(AsyncHookState):
    """Top-k sparsification with error feedback (memory): Stich, Cordonnier & Jaggi, "Sparsified SGD
    with memory", NeurIPS 2018, Algorithm 1; Lin et al., "Deep gradient compression", ICLR 2018
    (their gradient accumulation, without momentum correction or warm-up).

    Per rank and step: ``a = g + e`` (``e`` the residual), send the ``k`` largest ``|a|``, keep
    ``e = a`` with those zeroed. The residual is kept per parameter, not per bucket index: DDP
    rebuilds its buckets after the first step, and a bucket index may then hold other parameters.
    Invariant (tested): the sum over steps of what a rank sent, plus its residual, equals the sum of
    its gradients, up to the rounding of ``g + e``."""

    def __init__(self, group: dist.ProcessGroup | None, ratio: float, exchange: str,
                 timeout: timedelta | None, counter: WireCounter | None) -> None:
        super().__init__("topk", group, timeout, counter)
        if exchange not in TOPK_ALGORITHMS:
            raise ValueError(f"topk sends sparse (index, value) pairs by all-gather; the algorithm must be one of "
                             f"{', '.join(TOPK_ALGORITHMS)}, got {exchange!r}")
        self.ratio, self.exchange = ratio, exchange
        self.residuals: dict[torch.Tensor, torch.Tensor] = {}

    def residual(self, param: torch.Tensor) -> torch.Tensor | None:
        """The error-feedback residual kept for ``param`` (flattened), if any."""
        return self.residuals.get(param)

    def add_residuals(self, buffer: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``buffer += e`` per parameter; returns the parameters' views of ``buffer``."""
        views = split_views(buffer, [p.numel() for p in params])
        if sum(v.numel() for v in views) != buffer.numel():
            raise RuntimeError("DDP bucket layout: the parameters' sizes do not add up to the bucket's")
        for param, view in zip(params, views):
            kept = self.residuals.get(param)
            if kept is not None:
                view.add_(kept)
        return views

    def select(self, buffer: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """Indices and values of the top-k of ``buffer + e`` packed as one int32 block
        ``[indices | float32 values viewed as int32]``; the residual keeps the rest."""
        if buffer.numel() >= 2**31:
            raise ValueError(f"a bucket of {buffer.numel()} elements overflows int32 indices; lower bucket_cap_mb")
        views = self.add_residuals(buffer, params)
        index = buffer.abs().topk(topk_count(buffer.numel(), self.ratio), sorted=False).indices
        values = buffer[index].to(torch.float32)
        buffer[index] = 0
        for param, view in zip(params, views):
            self.residuals[param] = view.clone()
        return torch.cat([index.to(torch.int32), values.view(torch.int32)])

    def gather(self, block: torch.Tensor) -> torch.Tensor:
        """Every rank's block, in rank order (ring all-gather of ours, or the backend's)."""
        blocks = block.new_empty(self.size * block.numel())
        if self.exchange == "native":
            all_gather_native(blocks, block, self.group, timeout=self.timeout, counter=self.counter)
            return blocks
        chunks = split_views(blocks, [block.numel()] * self.size)
        chunks[self.rank].copy_(block)
        ring_all_gather(chunks, Comm.of("topk", self.group, self.timeout, self.counter))
        return blocks


def topk_hook(state: TopKHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Send the top-k of ``gradient + residual``, write the mean of every rank's sparse part."""
    buffer, params = bucket.buffer(), bucket.parameters()

    def job() -> torch.Tensor:
        block = state.select(buffer, params)
        k = block.numel() // 2
        total = torch.zeros(buffer.numel(), dtype=torch.float32)
        for b in state.gather(block).view(state.size, 2 * k):  # rank order: identical sums on every rank
            total.index_add_(0, b[:k].to(torch.int64), b[k:].view(torch.float32))
        buffer.copy_(total.div_(state.size))
        return buffer

    return state.submit(job)


# ---------------------------------------------------------------- PowerSGD (torch's hook)


class PowerSGDHookState:
    """torch's ``PowerSGDState`` (Vogels, Karimireddy & Jaggi, "PowerSGD: practical low-rank gradient
    compression for distributed optimization", NeurIPS 2019, Algorithms 1 and 2: rank-r compression
    with error feedback and warm start) plus our byte counter. ``payload`` counts the elements torch
    all-reduces, read from torch's own ``total_numel_after_compression`` and its P and Q buffers."""

    def __init__(self, group: dist.ProcessGroup | None, options: CompressionOptions,
                 counter: WireCounter | None, timeout: timedelta | None = None) -> None:
        self.torch_state = PowerSGDState(
            process_group=group, matrix_approximation_rank=options.powersgd_rank,
            start_powerSGD_iter=options.powersgd_start_iter,
            min_compression_rate=options.powersgd_min_compression_rate,
            use_error_feedback=True, warm_start=True, random_seed=options.seed)
        self.size, self.rank = group_size(group), group_rank(group)
        self.counter = counter if counter is not None else WireCounter()
        self.payload = 0
        self.calls = 0
        self.previous: torch.futures.Future[torch.Tensor] | None = None
        self.timeout_s = (timeout or DEFAULT_TIMEOUT).total_seconds()

    def close(self) -> None:
        """Nothing to stop: torch's hook runs on the backend's own threads."""

    def wait_previous(self) -> None:
        """Let the previous bucket's all-reduces finish before this bucket starts its own.

        torch's hook chains each bucket's all-reduces (uncompressed part, P, Q) through future
        callbacks, which gloo runs on its own threads: with two or more buckets in flight, ranks
        can issue bucket 0's P and bucket 1's first all-reduce in different orders, a collective
        mismatch (gloo: "Received data size doesn't match expected size", or a hang). One bucket
        at a time keeps every rank's order the same. The wait is bounded by the collective timeout.
        """
        previous, self.previous = self.previous, None
        if previous is None:
            return
        deadline = time.monotonic() + self.timeout_s
        while not previous.done():
            if time.monotonic() > deadline:
                raise CollectiveError(f"powersgd: the previous bucket's all-reduces did not finish within "
                                      f"{self.timeout_s:.0f} s; another rank probably died or stalled")
            time.sleep(0.0005)
        previous.wait()  # re-raises that bucket's error, if any

    def count(self, parts: Sequence[int], element_size: int) -> None:
        """One all-reduce per part (torch's uncompressed block, P, Q), modeled as the backend's ring."""
        self.payload += sum(parts)
        self.counter.add_modeled(sum(ring_elements_sent(p, self.size, self.rank) for p in parts) * element_size)


def powersgd_hook(state: PowerSGDHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """torch's ``powerSGD_hook`` (it works on gloo; ``batched_powerSGD_hook`` does not), counted."""
    ts = state.torch_state
    state.calls += 1
    plain = ts.iter < ts.start_powerSGD_iter
    before = ts.total_numel_after_compression
    state.wait_previous()
    future = powerSGD_hook(ts, bucket)
    state.previous = future
    buffer = bucket.buffer()
    if plain:
        state.count([buffer.numel()], buffer.element_size())
    else:  # torch allocated this bucket's P and Q before returning; the rest it sent uncompressed
        p, q = ts.p_memory_dict[bucket.index()].numel(), ts.q_memory_dict[bucket.index()].numel()
        state.count([ts.total_numel_after_compression - before - p - q, p, q], buffer.element_size())
    return future


# ---------------------------------------------------------------- one entry point


def compression_hook(kind: Compression, algorithm: str = "native", group: dist.ProcessGroup | None = None, *,
                     options: CompressionOptions = CompressionOptions(), local_size: int | None = None,
                     inter: str = "ring", timeout: timedelta | None = None,
                     counter: WireCounter | None = None) -> CommHook:
    """A DDP hook averaging gradients with compression ``kind`` over ``algorithm``.
    Call it on every rank of ``group`` at the same point."""
    if kind not in COMPRESSIONS:
        raise ValueError(f"unknown compression {kind!r}; expected one of {', '.join(COMPRESSIONS)}")
    registry.algorithm(algorithm)
    if kind == "none":
        return hook_for(algorithm, group, local_size=local_size, inter=inter, timeout=timeout, counter=counter)
    if kind in CAST_DTYPES:
        extra = algorithm_options(algorithm, group, local_size, inter, timeout)
        state = CastHookState(CAST_DTYPES[kind], algorithm, group, timeout=timeout, counter=counter, options=extra)
        return CommHook(state, cast_hook)
    if kind == "topk":
        return CommHook(TopKHookState(group, options.topk_ratio, algorithm, timeout, counter), topk_hook)
    if algorithm != "native":
        raise ValueError(f"powersgd uses torch's powerSGD_hook, whose all-reduces are the backend's own; "
                         f"use algorithm 'native', not {algorithm!r}")
    return CommHook(PowerSGDHookState(group, options, counter, timeout), powersgd_hook)


# ---------------------------------------------------------------- bytes per step


def powersgd_parts(shapes: Sequence[Sequence[int]], rank: int, min_compression_rate: float) -> tuple[int, int, int]:
    """Elements torch's PowerSGD all-reduces for one bucket: (uncompressed, P, Q). A tensor is viewed
    as ``shape[0] x rest``; with ``r = min(rows, cols, rank)`` it is compressed into ``rows·r + cols·r``
    elements when ``(rows + cols)·r·min_compression_rate < rows·cols`` (torch's ``_should_compress``)."""
    plain = ps = qs = 0
    for shape in shapes:
        numel = math.prod(shape)
        rows = shape[0] if shape else 1
        cols = numel // rows if rows else 0
        r = min(rows, cols, rank)
        if (rows + cols) * r * min_compression_rate < rows * cols:
            ps, qs = ps + rows * r, qs + cols * r
        else:
            plain += numel
    return plain, ps, qs


def bucket_bytes_sent(shapes: Sequence[Sequence[int]], n: int, rank: int, *, compression: str, algo: str,
                      element_size: int, options: CompressionOptions, local_size: int | None, inter: str) -> int:
    """Bytes ``rank`` of ``n`` sends for one bucket holding parameters of ``shapes``."""
    numel = sum(math.prod(s) for s in shapes)
    if compression == "none":
        return allreduce_elements_sent(algo, numel, n, rank, local_size, inter) * element_size
    if compression in CAST_DTYPES:
        return allreduce_elements_sent(algo, numel, n, rank, local_size, inter) * 2
    if compression == "topk":
        return all_gather_elements_sent(topk_count(numel, options.topk_ratio), n) * TOPK_BYTES_PER_ENTRY
    if compression == "powersgd":
        parts = powersgd_parts(shapes, options.powersgd_rank, options.powersgd_min_compression_rate)
        return sum(ring_elements_sent(p, n, rank) for p in parts) * element_size
    raise ValueError(f"unknown compression {compression!r}; expected one of {', '.join(COMPRESSIONS)}")


def wire_bytes_per_step(buckets: Sequence[Sequence[Sequence[int]]], world_size: int, *, compression: str = "none",
                        algorithm: str = "native", grad_dtype: torch.dtype = torch.float32,
                        options: CompressionOptions = CompressionOptions(), local_size: int | None = None,
                        inter: str = "ring") -> list[int]:
    """Bytes each rank sends in one optimizer step, by rank.

    ``buckets``: DDP's gradient buckets, each a list of parameter shapes. PowerSGD is counted as
    compressed (steps from ``powersgd_start_iter`` on; before, it sends what ``none`` sends)."""
    element_size = torch.empty((), dtype=grad_dtype).element_size()
    return [sum(bucket_bytes_sent(b, world_size, rank, compression=compression, algo=algorithm,
                                  element_size=element_size, options=options, local_size=local_size, inter=inter)
                for b in buckets)
            for rank in range(world_size)]
