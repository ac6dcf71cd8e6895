"""Consistency modes that replace DDP's per-step all-reduce: local SGD and the parameter server.

==================  ==================================================================================
plan                what each data-parallel rank does per step
==================  ==================================================================================
``sync: local_sgd``  steps its own optimizer on its own rows; every ``H = comm.local_sgd_period`` steps
                     the replicas average their parameters (after ``comm.local_sgd_warmup`` synchronous
                     steps that average gradients). Lin et al., "Don't use large mini-batches, use local
                     SGD", ICLR 2020, Algorithm 1 (post-local SGD: warm-up, then local steps); the
                     optimizer state (Adam moments) stays local, as in their paper.
``allreduce: ps``    pushes its gradient shards to the parameter servers and pulls the new parameters
                     (:mod:`~trainplan.runtime.ps`); ``sync: sync`` aggregates every worker's push of a
                     step and applies one update (the single-process step), ``sync: async`` applies each
                     push on arrival within the staleness bound ``comm.staleness`` (Ho et al. 2013,
                     stale synchronous parallel). With ``comm.ps_placement: dedicated`` the ranks after
                     the mesh's run only the server (:func:`~trainplan.runtime.ps.serve`).
==================  ==================================================================================

These modes run their own loop (:func:`train_replicas`): no per-step collective besides the mode's
own exchange, so a fast replica is not held back by a slow one between exchanges — the point of
the modes. Per-step records (loss, step time, wire bytes, observed staleness, peak memory) are
gathered once at the end and written by rank 0: ``loss`` is the mean of the replicas' losses at
that step index (each replica trains on its rows of the serial run's batch).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainplan.ir.plan import Plan
from trainplan.runtime.collectives import WireCounter, allreduce
from trainplan.runtime.collectives.hooks import algorithm_options
from trainplan.runtime.data import replica_batch, tokens_per_sample
from trainplan.runtime.checkpoint import fault_from_env, inject_fault
from trainplan.runtime.data_parallel import local_size, straggle
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.mesh import RankMesh
from trainplan.runtime.metrics import MetricsWriter, StepMetrics, layout_text, peak_memory_bytes, reset_peak_memory
from trainplan.runtime.ps import ParameterServerClient, serve
from trainplan.runtime.train import Trainer, save_full_parameters, seed_random_ops


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class LocalSGD:
    """Average gradients during warm-up, then parameters every ``period`` steps (and after the last)."""

    def __init__(self, plan: Plan, mesh: RankMesh, params: list[nn.Parameter], counter: WireCounter) -> None:
        self.params, self.counter = params, counter
        self.group, self.size = mesh.group("dp"), plan.mesh.dp
        self.algo = plan.allreduce
        self.timeout = timedelta(seconds=plan.collective_timeout_s)
        local = local_size(plan) if self.algo == "hierarchical" else None
        self.options = algorithm_options(self.algo, self.group, local, "ring", self.timeout)
        self.period, self.warmup = plan.comm.local_sgd_period, plan.comm.local_sgd_warmup
        self.averaged_last = False

    def _mean(self, tensors: list[torch.Tensor]) -> None:
        flat = flatten(tensors).div_(self.size)
        allreduce(flat, self.algo, self.group, timeout=self.timeout, counter=self.counter, **self.options)
        unflatten_into(flat, tensors)

    def step(self, index: int, update: Any) -> float:
        """Exchange around this rank's optimizer ``update``; returns 0 (no staleness in local SGD)."""
        if index < self.warmup:
            self._mean([p.grad for p in self.params if p.grad is not None])
        update()
        self.averaged_last = index >= self.warmup and (index + 1 - self.warmup) % self.period == 0
        if self.averaged_last:
            with torch.no_grad():
                self._mean([p.data for p in self.params])
        return 0.0

    def finish(self) -> None:
        """Average once more unless the last step did: one model at the end."""
        if not self.averaged_last:
            with torch.no_grad():
                self._mean([p.data for p in self.params])

    def close(self) -> None:
        pass


@dataclass
class RankRecord:
    """What one rank measured at each step; gathered at the end."""

    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    wire_bytes: list[int] = field(default_factory=list)
    staleness: list[float] = field(default_factory=list)
    memory: int = 0
    wall_s: float = 0.0
    role: str = "worker"  # or "server": a dedicated parameter server (no losses, only the bytes of its replies)


def train_replicas(plan: Plan, mesh: RankMesh, out_dir: Path, *, steps: int | None = None,
                   save_params: bool = False, straggler: tuple[int, float] | None = None,
                   checkpoint: bool = False) -> None:
    """Train ``plan`` (local SGD or parameter server) on this rank; rank 0 writes the metrics."""
    from trainplan.runtime.parallelize import build_rank_model

    if checkpoint:
        raise PlanExecutionError(f"checkpoints are not taken with allreduce: {plan.allreduce}, sync: {plan.sync} (local "
                                 "SGD / parameter server); run without --checkpoint-*/--resume, or plan sync: sync "
                                 "with a native, ring, tree or hierarchical all-reduce")

    steps = steps or plan.spec.training.steps
    fault = fault_from_env()
    if not mesh.in_mesh:  # a dedicated parameter server: serve, then hand in its record
        begin = time.perf_counter()
        server = serve(plan, mesh.rank, steps, lambda done: inject_fault(fault, mesh.rank, done, out_dir))
        record = RankRecord(wire_bytes=server.sent_by_step, wall_s=time.perf_counter() - begin,
                            memory=peak_memory_bytes(mesh.device), role="server")
        dist.all_gather_object([None] * dist.get_world_size(), record)
        return
    reset_peak_memory(mesh.device)
    seed_random_ops(plan.spec.training.seed, mesh)
    trainer = Trainer(plan, mesh, build_rank_model(plan, mesh))
    params = trainer.rank_model.parameters()
    counter = WireCounter()
    if plan.allreduce == "ps":
        exchange: LocalSGD | ParameterServerClient = ParameterServerClient(plan, mesh.rank, params, counter, steps)
    else:
        exchange = LocalSGD(plan, mesh, params, counter)
    record = RankRecord()
    task, training = trainer.rank_model.task, plan.spec.training
    begin = time.perf_counter()
    try:
        for step in range(steps):
            inject_fault(fault, mesh.rank, step, out_dir)
            start = time.perf_counter()
            before = counter.total_bytes
            inputs, targets = replica_batch(task, training.global_batch, training.seed, step, trainer.shard)
            micro = trainer.micro_losses(inputs, targets)
            straggle(straggler, mesh.rank)
            record.staleness.append(exchange.step(step, trainer.optimizer_step))
            record.losses.append(sum(micro) / len(micro))
            record.times.append(time.perf_counter() - start)
            record.wire_bytes.append(counter.total_bytes - before)
        exchange.finish()
    finally:
        exchange.close()
    record.wall_s = time.perf_counter() - begin
    record.memory = peak_memory_bytes(mesh.device)
    records: list[RankRecord | None] = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if save_params:
        save_full_parameters(trainer.rank_model, mesh, out_dir / "params")
    if mesh.rank == 0:
        write_records(plan, out_dir, [r for r in records if r is not None], tokens_per_sample(task))


def write_records(plan: Plan, out_dir: Path, every: list[RankRecord], tokens: int) -> None:
    """metrics.jsonl and summary.json from every rank's records (rank 0): losses, times and staleness
    from the workers; wire bytes from every rank, dedicated servers' replies included."""
    records = [r for r in every if r.role == "worker"]
    servers = [r for r in every if r.role == "server"]
    steps = len(records[0].losses)
    writer = MetricsWriter(out_dir, steps)
    batch_tokens = plan.spec.training.global_batch * tokens
    memory = max(r.memory for r in records)
    for i in range(steps):
        elapsed = records[0].times[i]
        extra = {"wire_bytes": sum(r.wire_bytes[i] for r in every),
                 "staleness_max": max(r.staleness[i] for r in records),
                 "staleness_mean": statistics.fmean(r.staleness[i] for r in records)}
        loss = statistics.fmean(r.losses[i] for r in records)
        writer.record(StepMetrics(i, loss, elapsed, batch_tokens / elapsed, memory, **extra))
    wall = max(r.wall_s for r in records)
    extra = {"wire_bytes_per_step": statistics.fmean(sum(r.wire_bytes[i] for r in every) for i in range(steps)),
             "samples_per_s": plan.spec.training.global_batch * steps / wall, "wall_s": wall,
             "rank_wall_s": [r.wall_s for r in records], "rank_step_times_s": [r.times for r in records]}
    if servers:
        extra.update(ps_servers_dedicated=len(servers), server_wall_s=[r.wall_s for r in servers],
                     server_memory_bytes=[r.memory for r in servers])
    writer.summary(layout=layout_text(plan), estimated_step_time_s=plan.estimate.step_time_s,
                   world_size=plan.world_size, extra=extra)
    writer.close()
