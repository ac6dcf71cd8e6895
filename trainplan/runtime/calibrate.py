"""``trainplan calibrate``: measure this machine and write the cluster description the planner uses.

One run spawns ``nproc`` local worker processes joined in a torch.distributed group (gloo on CPU,
NCCL on CUDA). Every worker times matrix products at the same time as the others (so the figure
is what one "device" achieves while its peers also compute), then the group times all-reduce and
a rank 0 <-> rank 1 send/recv ping-pong over message sizes 4 KiB..64 MiB. The parent turns the
timings into a :class:`~trainplan.ir.cluster.Cluster` (peak FLOP/s per dtype, GEMM efficiency at
training shapes forward and backward, memory, memory bandwidth, fixed cost per kernel, and an
alpha-beta link) and writes it as YAML, atomically, with a header saying how it was measured.

The code is split across three modules:

* :mod:`trainplan.runtime.local_workers` starts the processes. Workers rendezvous through a
  ``FileStore`` in a private folder, with sockets pinned to loopback, a group timeout and a
  parent deadline.
* :mod:`trainplan.runtime.calibrate_bench` holds the timing code that runs inside each worker.
* This module decides what to measure, analyses the timings, and builds and writes the cluster
  (the link and bandwidth fits are in :mod:`trainplan.runtime.calibrate_links`, the operator
  table and compute share in :mod:`trainplan.runtime.calibrate_ops`).
  Any worker failure kills the others and raises :class:`CalibrationError` carrying the failed
  worker's traceback.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from trainplan.ir.cluster import Cluster, deep_merge, preset_dict, preset_names
from trainplan.ir.units import format_bytes
from trainplan.runtime import local_workers
from trainplan.runtime.local_workers import WorkerContext, WorkerError  # noqa: F401 - WorkerContext re-exported
from trainplan.runtime.calibrate_links import (  # noqa: F401 - re-exported: callers and tests import them from here
    CalibrationError,
    bus_bandwidth,
    copy_bandwidth,
    fit_alpha_beta,
    latency_of,
    link_from_allreduce,
    link_from_p2p,
    native_collective_latency,
)
from trainplan.runtime.calibrate_links import round_significant as _sig
from trainplan.runtime.calibrate_ops import collective_wait, compute_share, measured_share, op_table, slowest_op_timings  # noqa: F401 - compute_share re-exported
from trainplan.runtime.calibrate_ops import slowest_tp_overhead, tp_overhead_fields
from trainplan.runtime.op_bench import OpTiming

KiB, MiB = 2**10, 2**20
WORKER_TARGET = "trainplan.runtime.calibrate_bench:calibration_worker"
CPU_DTYPES = ("fp32", "bf16", "fp16")
CUDA_DTYPES = ("fp32", "tf32", "bf16", "fp16")
TORCH_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- what to measure


@dataclass(frozen=True, slots=True)
class Gemm:
    """One matrix product ``(m, k) @ (k, n)``; ``family`` is ``'square'`` or ``'transformer'``.

    ``layout`` says which operand is read through a transposed view, as autograd runs a linear
    layer's products: ``"nt"`` the forward ``x @ W^T``, ``"nn"`` the input gradient ``dy @ W``,
    ``"tn"`` the weight gradient ``dy^T @ x`` (strided reads cost differently on CPUs).
    """

    m: int
    k: int
    n: int
    family: str
    layout: str = "nn"

    @property
    def flops(self) -> int:
        """2·m·k·n FLOPs: each of the m·n outputs is a length-k dot product (k multiplies, k adds)."""
        return 2 * self.m * self.k * self.n


def transformer_gemms(tokens: int, hidden: int, *, backward: bool = False) -> list[Gemm]:
    """The two MLP products of a transformer layer with b·s = ``tokens``: (b·s, h)@(h, 4h) and
    (b·s, 4h)@(4h, h), the 4h expansion of Vaswani et al. (2017) used by GPT and BERT.

    With ``backward``, each as a linear layer runs it in training: the forward product, then the
    input-gradient and weight-gradient products of its backward (each of the forward's FLOPs:
    Narayanan et al. 2021, Sec. 5.1), in the operand layouts autograd uses.
    """
    out = []
    for k, n in ((hidden, 4 * hidden), (4 * hidden, hidden)):
        if not backward:
            out.append(Gemm(tokens, k, n, "transformer"))
            continue
        out += [Gemm(tokens, k, n, "transformer", "nt"),  # y = x @ W^T, W stored (n, k)
                Gemm(tokens, n, k, "transformer", "nn"),  # dx = dy @ W
                Gemm(n, tokens, k, "transformer", "tn")]  # dW = dy^T @ x
    return out


def squares(*sizes: int) -> list[Gemm]:
    return [Gemm(s, s, s, "square") for s in sizes]


@dataclass(frozen=True, slots=True)
class BenchPlan:
    """Sizes and repeat counts of one calibration run (sent to the workers as JSON)."""

    gemms: tuple[Gemm, ...]
    dtypes: tuple[str, ...]
    warmup: int
    repeats: int
    max_gemm_s: float  # once one product of a dtype takes this long, its larger shapes are skipped
    min_sample_s: float  # products are batched per timed sample until a sample lasts this long
    comm_sizes: tuple[int, ...]
    copy_bytes: int = 64 * MiB  # the memory-bandwidth copy (source and destination each)
    kernel_chain: int = 64  # tiny linear layers timed forward + backward for the per-kernel cost
    op_dtypes: tuple[str, ...] = ("fp32",)  # dtypes of the per-operator table (trainplan.runtime.op_bench)
    quick: bool = False  # fewer sizes in the per-operator table

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BenchPlan":
        gemms = tuple(Gemm(**g) for g in data["gemms"])
        rest = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "gemms"}
        return cls(gemms=gemms, **rest)


def bench_plan(quick: bool, cuda: bool) -> BenchPlan:
    """The shapes that matter: squares plus transformer MLP products at sizes a plan for this kind
    of device uses (GPT-2 small/medium widths on CPU, 4k-8k widths on GPUs)."""
    sizes = tuple(4 * KiB * 4**i for i in range(8))  # 4 KiB .. 64 MiB
    if cuda:
        if quick:
            gemms = squares(1024, 4096) + transformer_gemms(4096, 2048, backward=True)
        else:
            gemms = (squares(1024, 2048, 4096, 8192) + transformer_gemms(8192, 4096, backward=True)
                     + transformer_gemms(8192, 8192, backward=True))
        return BenchPlan(tuple(gemms), CUDA_DTYPES, 3 if quick else 5, 5 if quick else 10, 1.0, 2e-3,
                         sizes[::2] if quick else sizes, copy_bytes=1024 * MiB, op_dtypes=("fp32", "bf16"), quick=quick)
    # CPU runs train small models: micro-batches of a few hundred tokens at widths of 128-1024.
    if quick:
        gemms = squares(256, 512, 1024) + transformer_gemms(256, 256, backward=True) + transformer_gemms(1024, 512)
        return BenchPlan(tuple(gemms), CPU_DTYPES, 1, 3, 0.25, 2e-3, sizes[::2], copy_bytes=16 * MiB, quick=True)
    gemms = (squares(256, 512, 1024, 2048) + transformer_gemms(128, 256, backward=True)
             + transformer_gemms(512, 512, backward=True) + transformer_gemms(2048, 768, backward=True)
             + transformer_gemms(2048, 1024, backward=True))
    return BenchPlan(tuple(gemms), CPU_DTYPES, 2, 7, 2.0, 2e-3, sizes)


def threads_per_process(cores: int, nproc: int) -> int:
    """Intra-op threads of one worker: ``cores // nproc``, at least 1.

    A CPU "device" in a plan is one worker process, and a run starts ``nproc`` of them on the same
    cores at once; sharing the cores evenly is what each worker gets then. Measuring with all cores
    would credit one worker with its peers' cores (and oversubscribe them when all run)."""
    return max(1, cores // max(1, nproc))


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_memory_bytes() -> int:
    """Available RAM in bytes: ``MemAvailable`` of /proc/meminfo (kB), else free pages x page size."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


# ---------------------------------------------------------------- pure analysis


@dataclass(frozen=True, slots=True)
class GemmTiming:
    dtype: str
    gemm: Gemm
    seconds: float

    @property
    def flops_per_s(self) -> float:
        return self.gemm.flops / self.seconds


def slowest_rank(per_rank: Sequence[Sequence[GemmTiming]]) -> list[GemmTiming]:
    """Per (dtype, shape), the slowest rank's time: a synchronous step waits for the slowest device."""
    worst: dict[tuple[str, Gemm], GemmTiming] = {}
    for timings in per_rank:
        for t in timings:
            key = (t.dtype, t.gemm)
            if key not in worst or t.seconds > worst[key].seconds:
                worst[key] = t
    return list(worst.values())


def peak_flops(timings: Sequence[GemmTiming]) -> dict[str, float]:
    """FLOP/s per dtype: the best shape measured (an achieved peak, not a datasheet one)."""
    best: dict[str, float] = {}
    for t in timings:
        best[t.dtype] = max(best.get(t.dtype, 0.0), t.flops_per_s)
    return best


def gemm_efficiency(timings: Sequence[GemmTiming], dtype: str) -> float:
    """Median FLOP/s of the transformer-shaped products of ``dtype`` over the best of ``dtype``.

    ``Device.efficiency`` is the fraction of ``peak_flops`` that a training step's large GEMMs
    reach. Our peak is already the best measured product, so the efficiency is how far the shapes a
    transformer layer really runs ((b·s, h)@(h, 4h) and back) fall short of it; the median over
    their sizes keeps one lucky or unlucky sample from setting it."""
    best = peak_flops(timings).get(dtype)
    typical = [t.flops_per_s for t in timings if t.dtype == dtype and t.gemm.family == "transformer"]
    if not best or not typical:
        raise ValueError(f"no transformer-shaped {dtype} products were measured")
    return min(1.0, statistics.median(typical) / best)


# ---------------------------------------------------------------- launching the workers


def run_local_workers(target: str, nproc: int, *, backend: str, config: dict[str, Any], threads: int,
                      timeout_s: float, group_timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """:func:`trainplan.runtime.local_workers.run_local_workers` for calibration. Messages are
    labelled "calibration" and the deadline message gives the calibrate fix, and a
    :class:`~trainplan.runtime.local_workers.WorkerError` is raised again as
    :class:`CalibrationError` with the same message."""
    try:
        return local_workers.run_local_workers(
            target, nproc, backend=backend, config=config, threads=threads, timeout_s=timeout_s,
            group_timeout_s=group_timeout_s, label="calibration",
            timeout_hint="Fix: run on a less loaded machine, use --quick, or raise --timeout.")
    except WorkerError as exc:
        raise CalibrationError(str(exc)) from None


# ---------------------------------------------------------------- parent: measure, build, write


@dataclass(frozen=True, slots=True)
class Measurement:
    """Everything one calibration run measured; times in seconds, sizes in bytes."""

    backend: str
    nproc: int
    threads: int
    quick: bool
    device_name: str
    memory: int
    memory_reserved: int
    gemms: tuple[GemmTiming, ...]
    p2p: tuple[tuple[int, float], ...]
    allreduce: tuple[tuple[int, float], ...]
    started_utc: str
    wall_s: float
    memory_bandwidth: float | None = None  # bytes/s of a copy, slowest rank (None: not measured)
    kernel_launch: float | None = None  # seconds of fixed cost per kernel, slowest rank
    algorithms: tuple[tuple[str, int, float], ...] = ()  # (our all-reduce algorithm, bytes, seconds)
    ops: dict[str, tuple[OpTiming, ...]] = field(default_factory=dict)  # per dtype, slowest rank per probe
    in_situ: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # per dtype, op_bench.in_situ_factors (rank 0)
    recompute: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)  # per dtype, calibrate_framework.recompute_overhead (rank 0)
    compute_share: float = 1.0  # fraction of its speed a worker keeps while all compute (CPU processes sharing cores)
    pace_reference_s: float | None = None  # the lockstep probe's step alone on rank 0 (calibrate_framework.lockstep_pace)
    collective_wait_s: float = 0.0  # what a blocking collective adds to a step beyond its time alone (lockstep_pace)
    fsdp_unit: dict[str, float] | None = None  # calibrate_framework.fsdp_unit_time, slowest rank per figure (None: not measured)
    tp_overhead: dict[str, Any] | None = None  # calibrate_framework.tp_overhead, slowest rank per figure (None: not measured)
    all_gather: tuple[tuple[int, float], ...] = ()  # (full buffer bytes, seconds) of all_gather_into_tensor, rank 0
    reduce_scatter: tuple[tuple[int, float], ...] = ()  # the same of reduce_scatter_tensor


def resolve_backend(backend: str | None) -> str:
    """``nccl`` when CUDA and NCCL are there, else ``gloo``; an explicit choice is checked."""
    if not dist.is_available():
        raise CalibrationError("this torch build has no torch.distributed; calibration needs it")
    nccl = torch.cuda.is_available() and dist.is_nccl_available()
    if backend is None:
        return "nccl" if nccl else "gloo"
    if backend not in ("gloo", "nccl"):
        raise CalibrationError(f"--backend: expected 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not nccl:
        raise CalibrationError("--backend nccl needs CUDA GPUs and a torch built with NCCL; use --backend gloo")
    return backend


def default_nproc(backend: str) -> int:
    """2 CPU processes (the smallest group that has links), or one process per visible GPU."""
    return torch.cuda.device_count() if backend == "nccl" else 2


def _check_nproc(nproc: int, backend: str) -> None:
    if nproc < 1:
        raise CalibrationError(f"--nproc: expected a positive number of processes, got {nproc}")
    if backend == "nccl" and nproc > torch.cuda.device_count():
        raise CalibrationError(f"--nproc {nproc} with NCCL needs {nproc} GPUs, but "
                               f"{torch.cuda.device_count()} are visible; pass --nproc {torch.cuda.device_count()}")


def measure(*, nproc: int, backend: str | None = None, quick: bool = False,
            timeout_s: float | None = None) -> Measurement:
    """Spawn the workers, time products and collectives, and gather the timings."""
    backend = resolve_backend(backend)
    _check_nproc(nproc, backend)
    threads = threads_per_process(usable_cores(), nproc)
    plan = bench_plan(quick, cuda=backend == "nccl")
    started, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.monotonic()
    cpu_memory = available_memory_bytes() // nproc  # read before the workers take their share
    results = run_local_workers(WORKER_TARGET, nproc, backend=backend, config=plan.to_json(), threads=threads,
                                timeout_s=timeout_s or (180.0 if quick else 1800.0))
    per_rank = [[GemmTiming(g["dtype"], Gemm(**g["gemm"]), g["seconds"]) for g in r["gemms"]] for r in results]
    cuda = backend == "nccl"
    return Measurement(
        backend=backend, nproc=nproc, threads=threads, quick=quick,
        device_name=results[0]["device_name"] if cuda else f"{cpu_model_name()} ({threads} thread(s) per process)",
        memory=min(r["memory"]["total"] for r in results) if cuda else cpu_memory,
        memory_reserved=max(r["memory"]["reserved"] for r in results),
        gemms=tuple(slowest_rank(per_rank)),
        p2p=tuple((int(n), float(s)) for n, s in results[0].get("p2p", [])),
        allreduce=tuple((int(n), float(s)) for n, s in results[0].get("allreduce", [])),
        all_gather=tuple((int(n), float(s)) for n, s in results[0].get("all_gather", [])),
        reduce_scatter=tuple((int(n), float(s)) for n, s in results[0].get("reduce_scatter", [])),
        started_utc=started, wall_s=time.monotonic() - t0,
        memory_bandwidth=min(copy_bandwidth(*r["copy"]) for r in results) if "copy" in results[0] else None,
        kernel_launch=max(r["kernel"] for r in results) if "kernel" in results[0] else None,
        algorithms=tuple((str(a), int(n), float(t)) for a, n, t in results[0].get("algorithms", [])),
        ops=slowest_op_timings([results[0].get("ops", {})]),
        in_situ={dt: {k: (float(a), float(b)) for k, (a, b) in d.items()} for dt, d in results[0].get("in_situ", {}).items()},
        recompute={dt: {k: (float(a), float(b)) for k, (a, b) in d.items()} for dt, d in results[0].get("recompute", {}).items()},
        compute_share=measured_share((results[0].get("lockstep") or [None])[0], usable_cores(), nproc, threads, backend),
        pace_reference_s=(results[0].get("lockstep") or [None, None])[1],
        collective_wait_s=collective_wait(results[0].get("lockstep"), backend),
        fsdp_unit={k: max(r["fsdp_unit"][k] for r in results) for k in results[0]["fsdp_unit"]}
        if "fsdp_unit" in results[0] else None,
        tp_overhead=slowest_tp_overhead([r.get("tp_overhead") for r in results]))


def cluster_from_measurement(m: Measurement, base: str | None = None) -> Cluster:
    """The cluster description of a measurement; ``base`` (a preset) fills what was not measured:
    power and price, and the links when a single process had no peer to measure them with."""
    if not m.gemms:
        raise CalibrationError("no matrix product could be timed on this device")
    if base is not None and base not in preset_names():
        raise CalibrationError(f"--base: unknown preset {base!r}; known presets: {', '.join(preset_names())}")
    peaks = peak_flops(m.gemms)
    ref = "bf16" if m.backend == "nccl" and "bf16" in peaks else "fp32"
    measured: dict[str, Any] = {
        "name": f"calibrated {socket.gethostname()}", "nodes": 1, "devices_per_node": m.nproc,
        "backend": m.backend,
        "device": {"name": m.device_name, "memory": m.memory, "memory_reserved": m.memory_reserved,
                   "efficiency": _sig(_efficiency(m.gemms, ref), 3)},
    }
    if m.memory_bandwidth is not None:
        measured["device"]["memory_bandwidth"] = _sig(m.memory_bandwidth)
    if m.kernel_launch is not None:
        measured["device"]["kernel_launch"] = _sig(m.kernel_launch)
    if m.tp_overhead is not None:
        measured["device"]["tp_overhead"] = tp_overhead_fields(m.tp_overhead, m.compute_share)
    if m.ops:
        measured["device"]["compute_share"] = _sig(m.compute_share, 3)
        if m.pace_reference_s is not None:
            measured["device"]["pace_reference_s"] = _sig(m.pace_reference_s)
        if m.collective_wait_s > 0:
            measured["device"]["collective_wait_s"] = _sig(m.collective_wait_s)
        measured["device"]["op_costs"] = {dtype: {op: {k: (_sig(v) if isinstance(v, float) else v) for k, v in c.items()}
                                                  for op, c in op_table(m, dtype).items()}
                                          for dtype in m.ops}
    if m.p2p:
        link = link_from_allreduce(m.allreduce, m.nproc) if m.allreduce else link_from_p2p(m.p2p)
        for name, timings in (("all_gather", m.all_gather), ("reduce_scatter", m.reduce_scatter)):
            if timings:
                link[f"{name}_latency"] = native_collective_latency(timings, m.nproc)
        if m.fsdp_unit is not None:
            # FSDP2's collectives as a training step pays them (every worker computing) rather than alone
            # after a barrier: the per-collective latencies that reproduce them on this link
            for name, key in (("all_gather", "gather_s"), ("reduce_scatter", "scatter_s")):
                link[f"{name}_latency"] = latency_of(m.fsdp_unit[key], m.fsdp_unit["unit_bytes"], m.nproc,
                                                     link["bandwidth"])
        measured.update(intra_node=link, inter_node=dict(link))
    elif base is None:
        raise CalibrationError("one process cannot measure links; run with --nproc 2 or more, "
                               "or pass --base PRESET to take the link figures from a preset")
    if m.fsdp_unit is not None:
        # FSDP2's hooks, measured with every worker at once (the shared speed): undo the planner's division
        measured["device"]["fsdp_unit_overhead"] = _sig(m.fsdp_unit["hooks_s"] * m.compute_share)
    raw = deep_merge(preset_dict(base), measured) if base else measured
    raw["device"]["peak_flops"] = {d: _sig(f) for d, f in peaks.items()}  # never keep a preset's guesses
    return Cluster.model_validate(raw)


def _efficiency(gemms: Sequence[GemmTiming], dtype: str) -> float:
    try:
        return gemm_efficiency(gemms, dtype)
    except ValueError as exc:
        raise CalibrationError(f"{exc}: smaller products already took longer than the per-product cap; "
                               "run on a less loaded machine") from None


def summary_lines(m: Measurement) -> list[str]:
    """What was measured and how, for the YAML header and the terminal."""
    mode = "quick" if m.quick else "full"
    lines = [f"Measured by `trainplan calibrate` ({mode}) on {socket.gethostname()} at {m.started_utc} in "
             f"{m.wall_s:.1f} s; torch {torch.__version__}, {m.backend}, {m.nproc} process(es) x {m.threads} "
             "thread(s) (threads = cores // processes, what each worker of a run gets).",
             "Matmul, all processes at once, median per shape, slowest rank; peak_flops = best shape per dtype;",
             "efficiency = median transformer-shaped (b*s,h)@(h,4h) / (b*s,4h)@(4h,h) over best, same dtype:"]
    for t in sorted(m.gemms, key=lambda t: (t.dtype, t.gemm.family, t.gemm.flops, t.gemm.layout)):
        shape = f"{t.gemm.m}x{t.gemm.k} @ {t.gemm.k}x{t.gemm.n} {t.gemm.layout}"
        lines.append(f"  {t.dtype:4} {t.gemm.family:11} {shape:>25}: {t.flops_per_s / 1e9:8.1f} GFLOP/s")
    if m.memory_bandwidth is not None:
        lines.append(f"memory_bandwidth: copy, all processes at once, slowest rank, (read + write) / time: "
                     f"{m.memory_bandwidth / 1e9:.2f} GB/s")
    if m.kernel_launch is not None:
        lines.append("kernel_launch: a chain of tiny (1x8)@(8x8) linear layers, forward + backward, over 3 kernels "
                     f"per layer (the cost model's count), slowest rank: {m.kernel_launch * 1e6:.2f} us")
    for dtype, timings in m.ops.items():
        fits = op_table(m, dtype)
        factors = ", ".join(f"{k} {a:.2f} / {b:.2f}" for k, (a, b) in m.in_situ.get(dtype, {}).items())
        lines.append(f"op_costs {dtype}: {len(fits)} operators, each alone with autograd at {len(timings) // max(1, len(fits))} "
                     "sizes, by rank 0 while the others wait (full speed; the planner divides by compute_share = "
                     f"{m.compute_share:.3g}: the speed a worker keeps when all train in lockstep, measured, at most "
                     "cores / (processes x threads)); time = fixed + per-unit x units (output elements, "
                     "FLOPs for linear / conv / attention), least squares in relative error; then fixed / per-unit costs x "
                     f"the in-situ factors measured on a generic 4-layer network at two sizes ({factors}); "
                     "forward | backward, e.g.:")
        for op in ("linear", "gelu", "layer_norm", "add", "view"):
            if op in fits:
                c = fits[op]
                lines.append(f"  {op:12} fwd {c['fwd_fixed_s'] * 1e6:7.2f} us + {c['fwd_per_unit_s'] * 1e12:9.3f} ps/{c['per']}"
                             f"  | bwd {c['bwd_fixed_s'] * 1e6:7.2f} us + {c['bwd_per_unit_s'] * 1e12:9.3f} ps/{c['per']}")
    if m.p2p:
        lines.append("p2p ping-pong, one way; link = least-squares fit of time = latency + bytes / bandwidth:")
        lines += [f"  {format_bytes(n):>10}: {s * 1e6:10.1f} us  {n / s / 1e9:8.3f} GB/s" for n, s in m.p2p]
        lines.append("all-reduce (rank 0), bus bandwidth = algbw * 2(n-1)/n as in nccl-tests:")
        lines += [f"  {format_bytes(n):>10}: {s * 1e6:10.1f} us  busbw {bus_bandwidth(n, s, m.nproc) / 1e9:8.3f} GB/s"
                  for n, s in m.allreduce]
        for name, timings in (("all-gather", m.all_gather), ("reduce-scatter", m.reduce_scatter)):
            if timings:
                lines.append(f"{name} (rank 0), full buffer; its latency = the intercept of a least-squares line / (n-1):")
                lines += [f"  {format_bytes(n):>10}: {s * 1e6:10.1f} us" for n, s in timings]
    if m.algorithms:
        names = list(dict.fromkeys(a for a, _, _ in m.algorithms))
        times = {(a, n): t for a, n, t in m.algorithms}
        lines.append("trainplan's all-reduce algorithms (parallel.allreduce), slowest rank, us / busbw GB/s; "
                     "`python bench/collectives.py --cluster FILE` puts the cost model's predictions next to them:")
        lines.append(f"  {'size':>10}  " + "  ".join(f"{a:>26}" for a in names))
        for n in sorted({n for _, n, _ in m.algorithms}):
            lines.append(f"  {format_bytes(n):>10}: " + "  ".join(
                f"{times[a, n] * 1e6:12.1f} us {bus_bandwidth(n, times[a, n], m.nproc) / 1e9:8.3f} GB/s" for a in names))
    return lines


def _p2p_text(m: Measurement) -> str:
    link = link_from_p2p(m.p2p)
    return f"{link['bandwidth'] / 1e9:.3g} GB/s, {link['latency'] * 1e6:.3g} us"


def render_yaml(cluster: Cluster, m: Measurement) -> str:
    """The cluster as YAML: a header comment from :func:`summary_lines`, then the fields."""
    data = cluster.model_dump(mode="json", by_alias=True, exclude_none=True)
    notes = {"intra_node": ("Bandwidth in bytes/s, latency in seconds: fitted so that the cost model's ring all-reduce "
                            "(2(n-1) latency + 2(n-1)/n bytes / bandwidth) reproduces the all-reduce above, measured with "
                            f"every process taking part (the idle ping-pong fit would say {_p2p_text(m)}); "
                            "all_gather_latency / reduce_scatter_latency: per ring step, torch.distributed's all-gather "
                            "and reduce-scatter as FSDP2's training steps paid them with every process computing "
                            "(calibrate_framework.fsdp_unit_time), or where that did not run as timed alone above")
                           if m.p2p else "Not measured (one process): taken from the base preset.",
             "inter_node": "One host: nothing between nodes was measured, so inter_node repeats intra_node. "
                           "For several hosts, write the network's figures here."}
    out = [f"# {line}" for line in summary_lines(m)]
    for key, value in data.items():
        if key in notes:
            out.append(f"# {notes[key]}")
        out.append(yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False).rstrip())
    text = "\n".join(out) + "\n"
    if Cluster.model_validate(yaml.safe_load(text)) != cluster:
        raise CalibrationError("internal error: the written cluster YAML does not read back the same")
    return text


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``, so
    a reader never sees half a file and an interrupted run leaves the old one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def calibrate(out_path: Path | None, *, nproc: int = 2, backend: str | None = None, quick: bool = False,
              base: str | None = None, timeout_s: float | None = None) -> Cluster:
    """Measure this machine with ``nproc`` processes and return (and write, if ``out_path``) its cluster.

    ``base`` defaults to ``cpu-local`` on gloo and to no preset on NCCL."""
    m = measure(nproc=nproc, backend=backend, quick=quick, timeout_s=timeout_s)
    cluster = cluster_from_measurement(m, base if base is not None else _default_base(m.backend))
    if out_path is not None:
        write_atomic(Path(out_path), render_yaml(cluster, m))
    return cluster


def _default_base(backend: str) -> str | None:
    return "cpu-local" if backend == "gloo" else None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainplan calibrate",
                                description="Measure this machine and write a cluster description for the planner.")
    p.add_argument("-o", "--output", type=Path, help="cluster YAML to write (default: print it)")
    p.add_argument("--nproc", type=_positive_int, help="processes to measure with (default: 2 on CPU, one per GPU)")
    p.add_argument("--backend", choices=("gloo", "nccl"), help="default: nccl when CUDA is there, else gloo")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (seconds, noisier)")
    p.add_argument("--base", choices=preset_names(), help="preset for unmeasured fields (default: cpu-local on gloo)")
    p.add_argument("--timeout", type=float, help="seconds before the workers are killed (default 180 quick, 1800)")
    p.add_argument("--refresh", type=Path, metavar="CLUSTER",
                   help="instead of a full calibration, bring CLUSTER (a CPU cluster YAML written by `trainplan "
                        "calibrate`) to the machine's current speed: re-run only the lockstep probe (about 15 s) and "
                        "scale its measured costs and compute_share (see docs/accuracy.md); with --quick, fewer rounds")
    return p


def calibrate_main(argv: list[str] | None = None) -> int:
    """``trainplan calibrate``: measure, print what was measured, write or print the cluster YAML."""
    args = build_parser().parse_args(argv)
    if args.refresh is not None:
        return _refresh_main(args.refresh, args.output, args.timeout, args.quick)
    backend = resolve_backend(args.backend)
    nproc = args.nproc or default_nproc(backend)
    m = measure(nproc=nproc, backend=backend, quick=args.quick, timeout_s=args.timeout)
    cluster = cluster_from_measurement(m, args.base if args.base is not None else _default_base(backend))
    text = render_yaml(cluster, m)
    if args.output is None:
        print(text, end="")
        return 0
    write_atomic(args.output, text)
    print("\n".join(summary_lines(m)))
    print(f"wrote {args.output}")
    return 0


def _refresh_main(source: Path, output: Path | None, timeout_s: float | None, quick: bool = False) -> int:
    """``trainplan calibrate --refresh CLUSTER [-o OUT] [--quick]``: :func:`calibrate_refresh.refresh`,
    written or printed."""
    from trainplan.ir.loading import load
    from trainplan.runtime.calibrate_refresh import refresh, render_refreshed

    before = load(Cluster, source)
    after, pace = refresh(before, timeout_s=timeout_s or 120.0, quick=quick)
    text = render_refreshed(after, before, pace, source)
    if output is None:
        print(text, end="")
        return 0
    write_atomic(output, text)
    print(text.splitlines()[0].removeprefix("# "))
    print(f"wrote {output}")
    return 0
