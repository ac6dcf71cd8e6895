"""Library entry point: parallelise a model you hold according to a plan, inside your own script.

::

    # torchrun --nproc-per-node 4 train.py
    model = build_my_model()                    # on the meta device (initialised by trainplan) or real
    parallel = auto_parallelize(model, (example_tokens,), plan=plan)
    for inputs, targets in my_batches():        # this replica's rows: micro_batch x num_microbatches
        loss = parallel.step(inputs, targets)   # forward, backward, gradient sync, optimizer step

The process group is the caller's (``torchrun`` sets the environment; without a group one is
created from it with the plan's timeout). Every rank passes the same model and plan; a model
with real weights must hold the same values on every rank. ``step`` works for every layout; a
model that is not pipelined can also be called directly for inference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from trainplan.ir.plan import Plan
from trainplan.ir.spec import TaskSpec
from trainplan.models import resolve_task
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.mesh import build_mesh, check_world_size
from trainplan.runtime.data_parallel import own_exchange
from trainplan.runtime.parallelize import build_rank_model, check_layout, check_structure
from trainplan.runtime.precision import flush_denormals
from trainplan.runtime.stores import join_process_group
from trainplan.runtime.train import Trainer


class ParallelModel:
    """This rank's part of a model under a plan, with its optimizer; train it with :meth:`step`."""

    def __init__(self, plan: Plan, trainer: Trainer) -> None:
        self.plan = plan
        self.trainer = trainer

    @property
    def modules(self) -> dict[int, nn.Module]:
        """This rank's stages (index -> module); ``{0: model}`` when the plan has no pipeline."""
        return self.trainer.rank_model.modules

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.trainer.rank_model.optimizer

    @property
    def rows_per_replica(self) -> int:
        """Samples this replica trains on per step: ``micro_batch x num_microbatches``."""
        return self.trainer.shard.rows

    def replica_rows(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This replica's rows of a step's global batch (the serial run's batch), as the runtime shards it."""
        shard = self.trainer.shard
        if global_batch.shape[0] != shard.rows * shard.replicas:
            raise PlanExecutionError(
                f"expected the global batch of {shard.rows * shard.replicas} rows, got {global_batch.shape[0]}"
            )
        return global_batch[shard.start : shard.start + shard.rows]

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One training step on this replica's rows; returns the mean loss over the global batch."""
        return self.trainer.step(inputs, targets)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.plan.mesh.pp > 1:
            raise PlanExecutionError("a pipelined model runs whole training steps: call step(inputs, targets)")
        return self.modules[0](*inputs)


def launched_world_size() -> int:
    """Processes of the caller's group, or the ones torchrun announced in the environment."""
    if dist.is_initialized():
        return dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        raise PlanExecutionError("auto_parallelize needs a process group: run under torchrun, or call "
                                 "torch.distributed.init_process_group first")
    return int(os.environ["WORLD_SIZE"])


def ensure_process_group(backend: str, timeout_s: float) -> None:
    """Join the group torchrun described in the environment, unless the caller already has one."""
    if dist.is_initialized():
        return
    launched_world_size()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    join_process_group(backend, timedelta(seconds=timeout_s))


def _process_group(plan: Plan) -> None:
    check_world_size(plan.mesh, launched_world_size(), "torchrun (WORLD_SIZE)")
    ensure_process_group(plan.spec.cluster.backend, plan.collective_timeout_s)


def check_example_inputs(example_inputs: Sequence[torch.Tensor], plan: Plan) -> None:
    """The example is one micro-batch or one replica's rows of the plan."""
    if not example_inputs or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise PlanExecutionError("example_inputs: expected a non-empty tuple of tensors (the model's inputs)")
    rows = example_inputs[0].shape[0] if example_inputs[0].dim() else 0
    allowed = {plan.micro_batch, plan.micro_batch * plan.num_microbatches}
    if rows not in allowed:
        raise PlanExecutionError(
            f"example_inputs: the batch dimension is {rows}, but the plan trains micro-batches of {plan.micro_batch} "
            f"and {plan.micro_batch * plan.num_microbatches} rows per replica"
        )


def auto_parallelize(model: nn.Module, example_inputs: Sequence[torch.Tensor], *, plan: Plan,
                     task: TaskSpec | None = None,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> ParallelModel:
    """Parallelise ``model`` on this rank as ``plan`` says; train the result with ``step``.

    ``task`` (default: the plan's spec's, resolved) picks the loss unless ``loss_fn`` is given.
    """
    check_example_inputs(example_inputs, plan)
    return parallelize(model, plan, task=task, loss_fn=loss_fn)


def parallelize(model: nn.Module, plan: Plan, *, task: TaskSpec | None = None,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> ParallelModel:
    """:func:`auto_parallelize` without the example-input check (the planner already traced the model)."""
    check_layout(plan)
    if own_exchange(plan):
        raise PlanExecutionError(f"allreduce: {plan.allreduce} with sync: {plan.sync} (local SGD / parameter server) runs "
                                 "only under `trainplan run` / `launch`, not in a parallelized model's step(); "
                                 "plan sync: sync with a native, ring, tree or hierarchical all-reduce")
    if plan.mesh.pp > 1 or plan.mesh.tp > 1:
        check_structure(plan, model, task or _task(plan))
    _process_group(plan)
    device = torch.device("cuda", torch.cuda.current_device()) if plan.spec.cluster.backend == "nccl" else torch.device("cpu")
    flush_denormals(device)  # as trainplan's own workers do (trainplan.runtime.precision)
    mesh = build_mesh(plan.mesh, device=device, timeout_s=plan.collective_timeout_s)
    rank_model = build_rank_model(plan, mesh, model=model, task=task)
    return ParallelModel(plan, Trainer(plan, mesh, rank_model, loss_fn))


def _task(plan: Plan) -> TaskSpec:
    return resolve_task(plan.spec.model, plan.spec.task)
