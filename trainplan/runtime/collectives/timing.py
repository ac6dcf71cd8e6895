"""Timing the all-reduce algorithms inside a local process group (the worker of bench/collectives.py).

One sample is one all-reduce of a zero-filled fp32 tensor, started right after a barrier and timed
on every rank; the sample is the slowest rank's time (an all-reduce is done when the last rank is),
taken with a MAX all-reduce outside the timed region. For each size the repeats are interleaved
over the algorithms (size, repeat, algorithm), so a burst of load from other processes on a shared
machine hits every algorithm alike. Zeros keep repeated in-place sums finite.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from trainplan.runtime.collectives.registry import algorithm
from trainplan.runtime.local_workers import WorkerContext


@dataclass(frozen=True)
class Variant:
    """An algorithm with its options, under a display name (``hierarchical(L=2)``)."""

    name: str
    algo: str
    options: dict[str, Any] = field(default_factory=dict)


def default_variants(world: int) -> list[Variant]:
    """native, ring, tree, and hierarchical with 2 ranks per "node" (1 when that is the whole group)."""
    local = 2 if world % 2 == 0 and world > 2 else 1
    return [Variant("native", "native"), Variant("ring", "ring"), Variant("tree", "tree"),
            Variant(f"hierarchical(L={local})", "hierarchical", {"local_size": local})]


def repeats_for(nbytes: int, repeats: int) -> int:
    """More samples for small messages, where one sample is short and noisier."""
    return repeats * 4 if nbytes <= 64 * 1024 else repeats


def time_once(variant: Variant, x: torch.Tensor) -> float:
    """Seconds of one all-reduce of ``x`` with ``variant``, the slowest rank's."""
    fn = algorithm(variant.algo)
    dist.barrier()
    start = time.perf_counter()
    fn(x, None, **variant.options)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def bench_worker(ctx: WorkerContext) -> dict[str, Any]:
    """Median seconds per (variant, size); config: ``sizes`` (bytes), ``repeats``, ``warmup``."""
    cfg = ctx.config
    variants = default_variants(ctx.world_size)
    rows = []
    for nbytes in cfg["sizes"]:
        x = torch.zeros(nbytes // 4, dtype=torch.float32)
        for v in variants:
            for _ in range(cfg["warmup"]):
                time_once(v, x)
        samples: dict[str, list[float]] = {v.name: [] for v in variants}
        for _ in range(repeats_for(nbytes, cfg["repeats"])):
            for v in variants:
                samples[v.name].append(time_once(v, x))
        rows += [{"variant": asdict(v), "bytes": nbytes, "median_s": statistics.median(samples[v.name]),
                  "min_s": min(samples[v.name]), "samples": len(samples[v.name])} for v in variants]
    return {"rows": rows}
