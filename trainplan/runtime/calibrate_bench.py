"""Worker side of ``trainplan calibrate``: what runs inside each worker process.

:func:`calibration_worker` is the ``'module:function'`` target that
:func:`trainplan.runtime.calibrate.measure` hands to
:func:`trainplan.runtime.local_workers.run_local_workers`. Every rank reads its process's memory
use, then times matrix products, a memory copy and the fixed cost per kernel while the other ranks
do the same, so each figure is what one device achieves while its peers also work. After that the
group times all-reduce and a
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
from trainplan.runtime.calibrate_framework import (
    FRAMEWORK_ROUNDS,
    QUICK_ROUNDS,
    barrier,
    fsdp_unit_time,
    lockstep_pace,
    recompute_overhead,
    tp_overhead,
)
from trainplan.runtime.local_workers import WorkerContext
from trainplan.runtime.op_bench import apply_in_situ, fit_op_costs, in_situ_factors, in_situ_networks, time_all


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


def _operand(rows: int, cols: int, transposed: bool, dtype: str, device: torch.device) -> torch.Tensor:
    """A ``(rows, cols)`` operand, stored as ``(cols, rows)`` and viewed transposed when ``transposed``."""
    if transposed:
        return torch.randn(cols, rows, device=device).to(TORCH_DTYPE[dtype]).t()
    return torch.randn(rows, cols, device=device).to(TORCH_DTYPE[dtype])


def time_gemm(gemm: Gemm, dtype: str, device: torch.device, plan: BenchPlan) -> float:
    """Median seconds of one product over ``plan.repeats`` samples after ``plan.warmup`` calls."""
    a = _operand(gemm.m, gemm.k, gemm.layout[0] == "t", dtype, device)
    b = _operand(gemm.k, gemm.n, gemm.layout[1] == "t", dtype, device)
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


def time_copy(nbytes: int, device: torch.device, plan: BenchPlan) -> float:
    """Median seconds of copying ``nbytes`` of fp32 from one buffer into another (STREAM Copy)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(plan.warmup + 1):
        dst.copy_(src)
    return statistics.median(_timed(lambda: dst.copy_(src), device) for _ in range(max(3, plan.repeats)))


def time_kernel_overhead(device: torch.device, plan: BenchPlan) -> float:
    """Seconds of fixed cost per kernel, as the cost model counts kernels.

    The cost model charges a layer's forward kernels once and its backward twice as many
    (:func:`trainplan.planner.cost.compute.kernel_overhead_s`). A chain of tiny linear layers
    ``(1, 8) @ (8, 8)`` does no measurable work, and each runs exactly that: one product forward,
    the input- and weight-gradient products backward. Its forward + backward time over three
    kernels per layer is therefore the fixed cost per counted kernel, with the framework's
    dispatch and autograd bookkeeping included (which dominate on CPUs; launch latency on GPUs).
    """
    n = plan.kernel_chain
    x = torch.randn(1, 8, device=device)
    weights = [(torch.eye(8, device=device) + 0.01 * torch.randn(8, 8, device=device)).requires_grad_()
               for _ in range(n)]

    def forward_backward() -> None:
        y = x
        for w in weights:
            y = y @ w
        y.sum().backward()

    for _ in range(plan.warmup + 2):
        forward_backward()
    per_chain = statistics.median(_timed(forward_backward, device, 10) for _ in range(max(3, plan.repeats)))
    return per_chain / (3 * n)


COLLECTIVES = ("allreduce", "all_gather", "reduce_scatter")  # torch.distributed's own, timed at every size


def time_collective(kind: str, nbytes: int, ctx: WorkerContext, plan: BenchPlan) -> float:
    """Median seconds of one ``kind`` (:data:`COLLECTIVES`) of ``nbytes`` (the full buffer; rank 0's
    clock, ranks aligned by a barrier): ``all_reduce``, ``all_gather_into_tensor`` and
    ``reduce_scatter_tensor`` as FSDP2 and DTensor call them."""
    n = ctx.world_size
    full = torch.zeros(max(n, nbytes // 4) // n * n, dtype=torch.float32, device=ctx.device)
    shard = torch.zeros(full.numel() // n, dtype=torch.float32, device=ctx.device)
    run = {"allreduce": lambda: dist.all_reduce(full),
           "all_gather": lambda: dist.all_gather_into_tensor(full, shard),
           "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, full)}[kind]
    for _ in range(plan.warmup):
        run()
    samples = []
    for _ in range(plan.repeats):
        barrier(ctx)
        samples.append(_timed(run, ctx.device))
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
        barrier(ctx)
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
    """One worker's measurements: memory, matrix products, memory copy, per-kernel cost and the
    per-operator table (:mod:`trainplan.runtime.op_bench`), all ranks at once, then communication."""
    plan = BenchPlan.from_json(ctx.config)
    rounds = QUICK_ROUNDS if plan.quick else FRAMEWORK_ROUNDS  # of the framework probes (their medians)
    result: dict[str, Any] = {"memory": _memory_facts(ctx.device)}
    if ctx.device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(ctx.device)
    barrier(ctx)
    result["gemms"] = measure_gemms(ctx.device, plan)
    barrier(ctx)
    result["copy"] = [plan.copy_bytes, time_copy(plan.copy_bytes, ctx.device, plan)]
    barrier(ctx)
    result["kernel"] = time_kernel_overhead(ctx.device, plan)
    barrier(ctx)
    if plan.op_dtypes and ctx.rank == 0:
        # One process times the operator table while the others wait at the barrier: each op at the
        # device's full speed; the planner divides by ``device.compute_share`` when the processes
        # outnumber the cores (time slices are longer than an op, so timing every rank at once
        # would mix full-speed and preempted calls).
        result["ops"], result["in_situ"] = {}, {}
        for dt in plan.op_dtypes:
            if not _dtype_works(dt, ctx.device):
                continue
            networks = in_situ_networks(ctx.device, TORCH_DTYPE[dt])
            timings = time_all(ctx.device, TORCH_DTYPE[dt], plan.quick, networks)
            result["ops"][dt] = [[t.op, t.units, t.fwd_s, t.bwd_s] for t in timings]
            fits = fit_op_costs(timings)
            factors = in_situ_factors(fits, networks)
            result["in_situ"][dt] = {k: list(v) for k, v in factors.items()}
            result.setdefault("recompute", {})[dt] = recompute_overhead(apply_in_situ(fits, factors), ctx.device,
                                                                        TORCH_DTYPE[dt], rounds=rounds)
    if plan.op_dtypes:
        barrier(ctx)
    if plan.op_dtypes and ctx.world_size > 1 and ctx.device.type == "cpu":
        result["lockstep"] = lockstep_pace(ctx, **({"rounds": QUICK_ROUNDS} if plan.quick else {}))
        result["fsdp_unit"] = fsdp_unit_time(ctx, rounds=rounds)
        result["tp_overhead"] = tp_overhead(ctx, rounds=rounds)
    if ctx.world_size > 1:
        for kind in COLLECTIVES:
            result[kind] = [[n, time_collective(kind, n, ctx, plan)] for n in plan.comm_sizes]
        result["p2p"] = [[n, time_pingpong(n, ctx, plan)] for n in plan.comm_sizes]
        if ctx.device.type == "cpu":  # our algorithms move CPU tensors over gloo point-to-point
            result["algorithms"] = time_algorithms(ctx, plan)
    return result


def time_algorithms(ctx: WorkerContext, plan: BenchPlan) -> list[list[Any]]:
    """``[name, bytes, median seconds]`` of trainplan's own ring, tree and hierarchical all-reduce
    (:mod:`trainplan.runtime.collectives`) at every size, the slowest rank's time per sample."""
    from trainplan.runtime.collectives.timing import default_variants, time_once

    out: list[list[Any]] = []
    variants = [v for v in default_variants(ctx.world_size) if v.algo != "native"]
    for nbytes in plan.comm_sizes:
        x = torch.zeros(nbytes // 4, dtype=torch.float32)
        for v in variants:
            for _ in range(plan.warmup):
                time_once(v, x)
            out.append([v.name, nbytes, statistics.median(time_once(v, x) for _ in range(plan.repeats))])
    return out


def pace_worker(ctx: WorkerContext) -> dict[str, Any]:
    """``trainplan calibrate --refresh``: the lockstep probe alone (:func:`lockstep_pace`), on rank 0
    ``{"lockstep": [share, solo seconds, collective wait seconds]}``; ``config["quick"]``: the rounds of
    ``calibrate --quick``."""
    return {"lockstep": lockstep_pace(ctx, **({"rounds": QUICK_ROUNDS} if ctx.config.get("quick") else {}))}
