"""Worker side of ``trainplan calibrate``: what runs inside each worker process.

:func:`calibration_worker` is the ``'module:function'`` target that
:func:`trainplan.runtime.calibrate.measure` hands to
:func:`trainplan.runtime.local_workers.run_local_workers`. Every rank reads its process's memory
use, then times matrix products while the other ranks do the same, so the figure is what one
device achieves while its peers also compute. After that the group times all-reduce and a
rank 0 <-> rank 1 send/recv ping-pong at every size in :attr:`BenchPlan.comm_sizes`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainplan.runtime.calibrate import TORCH_DTYPE, BenchPlan, CalibrationError, Gemm
from trainplan.runtime.local_workers import WorkerContext


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Seconds per call of ``calls`` back-to-back calls (device work included)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls


def _dtype_works(dtype: str, device: torch.device) -> bool:
    try:
        a = torch.ones(8, 8, dtype=TORCH_DTYPE[dtype], device=device)
        return bool(torch.isfinite(a @ a).all())
    except RuntimeError:
        return False


def _set_fp32_precision(dtype: str, device: torch.device) -> None:
    """fp32 products on NVIDIA GPUs use TF32 tensor cores only when asked; time both separately."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32" if dtype == "tf32" else "ieee"


def time_gemm(gemm: Gemm, dtype: str, device: torch.device, plan: BenchPlan) -> float:
    """Median seconds of one product over ``plan.repeats`` samples after ``plan.warmup`` calls."""
    a = torch.randn(gemm.m, gemm.k, device=device).to(TORCH_DTYPE[dtype])
    b = torch.randn(gemm.k, gemm.n, device=device).to(TORCH_DTYPE[dtype])
    for _ in range(plan.warmup):
        torch.mm(a, b)
    once = _timed(lambda: torch.mm(a, b), device)
    # Tiny GPU products finish faster than a synchronisation; batch them so a sample is measurable.
    calls = min(1000, max(1, math.ceil(plan.min_sample_s / max(once, 1e-9))))
    return statistics.median(_timed(lambda: torch.mm(a, b), device, calls) for _ in range(plan.repeats))


def measure_gemms(device: torch.device, plan: BenchPlan) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for dtype in plan.dtypes:
        if not _dtype_works(dtype, device):
            continue
        _set_fp32_precision(dtype, device)
        for gemm in sorted(plan.gemms, key=lambda g: g.flops):
            seconds = time_gemm(gemm, dtype, device, plan)
            out.append({"dtype": dtype, "gemm": asdict(gemm), "seconds": seconds})
            if seconds > plan.max_gemm_s:
                break
    return out


def _barrier(ctx: WorkerContext) -> None:
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def time_allreduce(nbytes: int, ctx: WorkerContext, plan: BenchPlan) -> float:
    """Median seconds of one all-reduce of ``nbytes`` (rank 0's clock, ranks aligned by a barrier)."""
    x = torch.zeros(nbytes // 4, dtype=torch.float32, device=ctx.device)
    for _ in range(plan.warmup):
        dist.all_reduce(x)
    samples = []
    for _ in range(plan.repeats):
        _barrier(ctx)
        samples.append(_timed(lambda: dist.all_reduce(x), ctx.device))
    return statistics.median(samples)


def time_pingpong(nbytes: int, ctx: WorkerContext, plan: BenchPlan) -> float:
    """Median one-way seconds of an ``nbytes`` message: half a rank 0 -> 1 -> 0 round trip."""
    x = torch.zeros(nbytes // 4, dtype=torch.float32, device=ctx.device)

    def round_trip() -> None:
        if ctx.rank == 0:
            dist.send(x, 1)
            dist.recv(x, 1)
        elif ctx.rank == 1:
            dist.recv(x, 0)
            dist.send(x, 0)

    for _ in range(plan.warmup):
        round_trip()
    samples = []
    for _ in range(plan.repeats):
        _barrier(ctx)
        samples.append(_timed(round_trip, ctx.device) / 2)
    return statistics.median(samples)


def _memory_facts(device: torch.device) -> dict[str, int]:
    """Memory held before any tensor (process RSS on CPU; CUDA context, NCCL and neighbours on a GPU)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"reserved": total - free, "total": total}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return {"reserved": int(line.split()[1]) * 1024}
    raise CalibrationError("cannot read this process's memory use from /proc/self/status")


def calibration_worker(ctx: WorkerContext) -> dict[str, Any]:
    """One worker's measurements: memory, matrix products (all ranks at once), then communication."""
    plan = BenchPlan.from_json(ctx.config)
    result: dict[str, Any] = {"memory": _memory_facts(ctx.device)}
    if ctx.device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(ctx.device)
    _barrier(ctx)
    result["gemms"] = measure_gemms(ctx.device, plan)
    _barrier(ctx)
    if ctx.world_size > 1:
        result["allreduce"] = [[n, time_allreduce(n, ctx, plan)] for n in plan.comm_sizes]
        result["p2p"] = [[n, time_pingpong(n, ctx, plan)] for n in plan.comm_sizes]
    return result
