"""The training loop of a plan on one rank, and the plain single-process reference run of a spec.

One step: take this replica's rows of the step's global batch, run forward and backward over the
micro-batches (a pipeline schedule when ``pp > 1``, plain gradient accumulation otherwise), sum
tied gradients across stages, unscale and check fp16 gradients, step the optimizer, and reduce
the loss to the mean over the global batch. Rank 0 writes the metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from trainplan.ir.plan import Plan
from trainplan.ir.spec import Spec
from trainplan.models import loss_fn as task_loss_fn
from trainplan.models import synthetic_batch
from trainplan.runtime.checkpoint import Checkpointer, CheckpointOptions, fault_from_env, inject_fault
from trainplan.runtime.data import microbatches, replica_batch, shard_of, tokens_per_sample
from trainplan.runtime.data_parallel import gradient_sync, make_optimizer, own_exchange, straggle
from trainplan.runtime.measure import MEMORY_SAMPLE_STEPS, Meter, finish
from trainplan.runtime.materialize import build_meta_model, materialize_local, model_aliases
from trainplan.runtime.mesh import RankMesh
from trainplan.runtime.metrics import MetricsWriter, StepMetrics, layout_text, peak_memory_bytes, reset_peak_memory
from trainplan.runtime.parallelize import RankModel, build_rank_model
from trainplan.runtime.pipeline import PipelineRunner
from trainplan.runtime.precision import LossScaler, autocast, autocast_loss, denormals_flushed
from trainplan.runtime.tensor_parallel import loss_context

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def as_float(value: torch.Tensor) -> float:
    """A scalar loss as a Python float (a replicated DTensor's local value is the whole value)."""
    return float(value.to_local() if isinstance(value, DTensor) else value)


class AccumulationStep:
    """Forward and backward of a replica's micro-batches through one (wrapped) module, no pipeline."""

    def __init__(self, module: nn.Module, loss_fn: LossFn, scaler: LossScaler, loss_parallel: bool) -> None:
        self.module, self.loss_fn, self.scaler, self.loss_parallel = module, loss_fn, scaler, loss_parallel

    def __call__(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> list[float]:
        """The mean loss of each micro-batch; gradients of the replica's mean loss accumulated."""
        losses = []
        n = len(inputs)
        for i, (x, y) in enumerate(zip(inputs, targets)):
            with gradient_sync(self.module, enabled=i == n - 1), loss_context(self.loss_parallel):
                loss = self.loss_fn(self.module(x), y)
                self.scaler.scale_loss(loss / n).backward()
            losses.append(as_float(loss.detach()))
        return losses


def _pipeline_step(plan: Plan, rank_model: RankModel, mesh: RankMesh, loss_fn: LossFn,
                   scaler: LossScaler) -> Callable[[list[torch.Tensor], list[torch.Tensor]], list[float]]:
    def scaled_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return scaler.scale_loss(loss_fn(output, target))

    runner = PipelineRunner(plan, mesh, rank_model.modules, scaled_loss,
                            lambda: loss_context(rank_model.loss_parallel))

    def step(inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> list[float]:
        losses = runner.step(torch.cat(inputs), torch.cat(targets))
        return [as_float(loss.detach()) / scaler.scale for loss in losses]

    step.runner = runner  # type: ignore[attr-defined]  # for trainplan.runtime.measure
    return step


def global_mean_loss(micro_losses: list[float], plan: Plan, mesh: RankMesh) -> float:
    """The global batch's mean loss on every rank, from the last stage's micro-batch losses of each replica."""
    counts = mesh.tp_rank == 0 and bool(micro_losses)
    share = sum(micro_losses) / (len(micro_losses) * plan.mesh.dp) if counts else 0.0
    total = torch.tensor([share], dtype=torch.float64, device=mesh.device)
    dist.all_reduce(total)
    return float(total)


def mean_loss_and_peak_memory(micro_losses: list[float], plan: Plan, mesh: RankMesh, memory: int) -> tuple[float, int]:
    """:func:`global_mean_loss` and the largest of every rank's ``memory``, in one collective.

    A sum and a maximum need two all-reduces; one all-gather of ``(share, memory)`` pairs gives
    both (float64 holds byte counts below 2**53 exactly), one small collective less per step.
    """
    counts = mesh.tp_rank == 0 and bool(micro_losses)
    share = sum(micro_losses) / (len(micro_losses) * plan.mesh.dp) if counts else 0.0
    mine = torch.tensor([share, float(memory)], dtype=torch.float64, device=mesh.device)
    everyone = torch.empty(dist.get_world_size() * 2, dtype=torch.float64, device=mesh.device)
    dist.all_gather_into_tensor(everyone, mine)
    pairs = everyone.view(-1, 2)
    return float(pairs[:, 0].sum()), int(pairs[:, 1].max())


def seed_random_ops(seed: int, mesh: RankMesh | None) -> None:
    """Seed torch's generator for random ops (dropout): one stream per replica and pipeline rank.

    Tensor-parallel ranks of a replica share the stream, so dropout on replicated activations
    draws the same mask on each; replicas and stages draw different ones, as Megatron-LM does.
    A run with dropout is therefore a valid run but not the serial run's numbers: the parallel =
    serial contract holds for models without dropout.
    """
    offset = 0 if mesh is None else 1_000_003 * mesh.pp_rank + 1_009 * mesh.dp_rank
    torch.manual_seed(seed + offset)


class Trainer:
    """One optimizer step of a plan on this rank: micro-batches, backward, gradient sync, update."""

    def __init__(self, plan: Plan, mesh: RankMesh, rank_model: RankModel, loss_fn: LossFn | None = None) -> None:
        self.plan, self.mesh, self.rank_model = plan, mesh, rank_model
        precision = plan.spec.training.precision
        loss = autocast_loss(loss_fn or task_loss_fn(rank_model.task), precision, mesh.device)
        self.scaler = LossScaler(precision == "fp16", mesh.device)
        self.shard = shard_of(plan, mesh.dp_rank)
        if plan.mesh.pp > 1:
            self._micro = _pipeline_step(plan, rank_model, mesh, loss, self.scaler)
        else:
            self._micro = AccumulationStep(rank_model.modules[0], loss, self.scaler, rank_model.loss_parallel)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Train on this replica's rows (``micro_batch x num_microbatches``); the global mean loss."""
        micro_losses = self.micro_losses(inputs, targets)
        self._optimizer_step()
        return global_mean_loss(micro_losses, self.plan, self.mesh)

    def step_with_memory(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
        """:meth:`step`, and the peak memory over all ranks so far (for the run's metrics), in one collective."""
        micro_losses = self.micro_losses(inputs, targets)
        self._optimizer_step()
        return mean_loss_and_peak_memory(micro_losses, self.plan, self.mesh, peak_memory_bytes(self.mesh.device))

    def micro_losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[float]:
        """Forward and backward over this replica's rows, no update; each micro-batch's loss."""
        inputs, targets = inputs.to(self.mesh.device), targets.to(self.mesh.device)
        return self._micro(microbatches(inputs, self.shard), microbatches(targets, self.shard))

    def optimizer_step(self) -> None:
        """The update after :meth:`micro_losses` (local SGD and the parameter server call it themselves)."""
        self._optimizer_step()

    def _optimizer_step(self) -> None:
        """Sum tied gradients, unscale/check (fp16), step unless any rank overflowed, clear gradients."""
        rank_model = self.rank_model
        rank_model.tied.all_reduce()
        finite = self.scaler.unscale_and_check(rank_model.parameters())
        if finite:
            rank_model.optimizer.step()
        self.scaler.update(finite)
        rank_model.optimizer.zero_grad(set_to_none=True)


def train(plan: Plan, mesh: RankMesh, out_dir: Path, *, steps: int | None = None, save_params: bool = False,
          checkpoint: CheckpointOptions | None = None, straggler: tuple[int, float] | None = None) -> None:
    """Run ``steps`` (default: the spec's) training steps of ``plan`` on this rank; rank 0 writes metrics.

    With ``checkpoint``: resume from / save checkpoints (:mod:`~trainplan.runtime.checkpoint`).
    """
    steps = steps or plan.spec.training.steps
    if own_exchange(plan):  # local SGD, parameter server: their own loop (``straggler`` delays a rank per step)
        from trainplan.runtime.sync_modes import train_replicas
        return train_replicas(plan, mesh, out_dir, steps=steps, save_params=save_params, straggler=straggler,
                              checkpoint=checkpoint is not None)
    reset_peak_memory(mesh.device)
    seed_random_ops(plan.spec.training.seed, mesh)
    trainer = Trainer(plan, mesh, build_rank_model(plan, mesh))
    meter = Meter(trainer)  # measured memory and time next to the plan's estimates
    task, training = trainer.rank_model.task, plan.spec.training
    ckpt = Checkpointer.of(checkpoint, plan, mesh, trainer, out_dir) if checkpoint else None
    first, fault = (ckpt.restore() if ckpt else 0), fault_from_env()
    writer = MetricsWriter(out_dir, steps, first_step=first) if mesh.rank == 0 else None
    tokens = training.global_batch * tokens_per_sample(task)
    for step in range(first, steps):
        inject_fault(fault, mesh.rank, step, out_dir)
        start = time.perf_counter()
        inputs, targets = replica_batch(task, training.global_batch, training.seed, step, trainer.shard)
        straggle(straggler, mesh.rank)
        loss, memory = trainer.step_with_memory(inputs, targets)
        elapsed = time.perf_counter() - start
        wire = trainer.rank_model.comm.step_bytes(mesh.device) if trainer.rank_model.comm else None
        if writer is not None:
            writer.record(StepMetrics(step, loss, elapsed, tokens / elapsed, memory, wire_bytes=wire))
        if ckpt is not None:
            ckpt.after_step(step + 1)
    if ckpt is not None:
        ckpt.finish()  # an asynchronous save still being written is waited for and committed
    if trainer.rank_model.comm:
        trainer.rank_model.comm.close()
    if save_params:
        save_full_parameters(trainer.rank_model, mesh, out_dir / "params")
    measured = finish(meter, plan)
    if writer is not None:
        writer.summary(layout=layout_text(plan), estimated_step_time_s=plan.estimate.step_time_s,
                       world_size=plan.mesh.world_size, extra=measured, untimed_steps=MEMORY_SAMPLE_STEPS)
        writer.close()


def save_full_parameters(rank_model: RankModel, mesh: RankMesh, folder: Path) -> None:
    """Write each stage's parameters, gathered whole, to ``folder/stage-<i>.pt`` (from its dp=0, tp=0 rank).

    Gathering a sharded parameter is a collective over its mesh, so every rank of a stage takes
    part, in the same (registration) order.
    """
    for index, module in sorted(rank_model.inner.items()):
        full = {}
        for name, param in module.named_parameters():
            value = param.full_tensor() if isinstance(param, DTensor) else param
            full[name] = value.detach().cpu().clone()
        if mesh.dp_rank == 0 and mesh.tp_rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(full, folder / f"stage-{index}.pt")


def run_reference(spec: Spec, out_dir: str | Path, steps: int | None = None, *, save_params: bool = False) -> None:
    """The plain single-process run of ``spec``: the whole model, the whole global batch per step.

    This is what ``--nproc 1`` means and what every parallel layout must reproduce. It computes
    with subnormals flushed, as the parallel workers do (:func:`~trainplan.runtime.precision.flush_denormals`),
    and restores the caller's setting afterwards (it may run inside another program's process).
    """
    with denormals_flushed(torch.device("cpu")):
        _reference_run(spec, Path(out_dir), steps or spec.training.steps, save_params)


def _reference_run(spec: Spec, out_dir: Path, steps: int, save_params: bool) -> None:
    device = torch.device("cpu")
    seed_random_ops(spec.training.seed, None)
    built = build_meta_model(spec)
    model = built.module
    materialize_local([model], device=device, seed=spec.training.seed, aliases=model_aliases(model))
    optimizer = make_optimizer(list(model.parameters()), spec.training, 0, None)
    loss_fn = task_loss_fn(built.task)
    scaler = LossScaler(spec.training.precision == "fp16", device)
    writer = MetricsWriter(out_dir, steps)
    tokens = spec.training.global_batch * tokens_per_sample(built.task)
    for step in range(steps):
        start = time.perf_counter()
        inputs, targets = synthetic_batch(built.task, spec.training.global_batch, spec.training.seed, step)
        with autocast(spec.training.precision, device):
            loss = loss_fn(model(inputs), targets)
        scaler.scale_loss(loss).backward()
        finite = scaler.unscale_and_check(model.parameters())
        if finite:
            optimizer.step()
        scaler.update(finite)
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        writer.record(StepMetrics(step, float(loss.detach()), elapsed, tokens / elapsed, peak_memory_bytes(device)))
    if save_params:
        (out_dir / "params").mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out_dir / "params" / "stage-0.pt")
    writer.summary(layout="reference: 1 process, whole batch", estimated_step_time_s=None, world_size=1)
    writer.close()

