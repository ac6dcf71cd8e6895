"""Data parallelism and the ZeRO stages (``plan.zero``) over the mesh's ``dp`` dimension.

=====  ====================================================================================
zero   what the runtime uses
=====  ====================================================================================
0      ``DistributedDataParallel`` (replicated parameters, gradients all-reduced, averaged);
       with tensor parallelism (DTensor parameters, which DDP cannot hold) torch's FSDP2-based
       ``replicate``, the same algorithm on the same mesh dimension
1      DDP for the gradients + ``ZeroRedundancyOptimizer``: each replica keeps the optimizer
       state of 1/dp of the parameters and broadcasts the ones it updated (ZeRO stage 1,
       Rajbhandari et al. 2020 §5.1); not available with tensor parallelism (DTensor)
2      FSDP2 ``fully_shard(reshard_after_forward=False)``: optimizer state and gradients sharded
       (reduce-scattered); parameters stay gathered from forward to backward (ZeRO-2 memory for
       gradients and optimizer state)
3      FSDP2 ``fully_shard(reshard_after_forward=True)``: parameters too are sharded and
       gathered again for backward (ZeRO-3)
=====  ====================================================================================

Inside pipeline stages DDP runs with ``find_unused_parameters=True``: a schedule runs several
backward passes per step, and DDP's bucket rebuild after its first iteration then fails an
internal assert (torch 2.13); without the rebuild the reduction is the same.
FSDP2 shards every block (``ModuleList`` element) as its own unit, then the rest of the module.
FSDP and ``replicate`` are applied on the meta device, before :mod:`~trainplan.runtime.materialize`
allocates the local shards; DDP needs real tensors and wraps after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from trainplan.ir.plan import Plan
from trainplan.ir.spec import TrainingSpec
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.mesh import RankMesh
from trainplan.runtime.structure import present


def _has_dtensors(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


SAME_SUM_ALGORITHMS = ("native", "ring", "tree", "hierarchical")


def check_data_parallel(plan: Plan) -> None:
    """Refuse data-parallel options the runtime cannot execute, before any work.

    Ring, tree and hierarchical all-reduce compute the same sum as the backend's own all-reduce,
    which the runtime uses for them (the run's summary says so); asynchronous modes, a parameter
    server and gradient compression change the arithmetic and are not executed by this runtime.
    """
    if plan.sync != "sync":
        raise PlanExecutionError(f"sync: {plan.sync!r} is not executed by this runtime; plan with sync: sync")
    if plan.compression != "none":
        raise PlanExecutionError(
            f"compression: {plan.compression!r} is not executed by this runtime; plan with compression: none"
        )
    if plan.allreduce not in SAME_SUM_ALGORITHMS:
        raise PlanExecutionError(
            f"allreduce: {plan.allreduce!r} is not executed by this runtime; plan with one of {', '.join(SAME_SUM_ALGORITHMS)}"
        )
    check_zero(plan.zero, plan.mesh.tp)


def check_zero(zero: int, tp: int) -> None:
    """ZeRO stages the runtime cannot combine with tensor parallelism."""
    if zero == 1 and tp > 1:
        raise PlanExecutionError(
            "zero: 1 with tp > 1 is not supported: ZeroRedundancyOptimizer cannot broadcast tensor-parallel "
            "(DTensor) parameters; use zero 0, 2 or 3 with tensor parallelism"
        )


def shard_before_materialize(module: nn.Module, zero: int, mesh: RankMesh, blocks: list[str]) -> None:
    """ZeRO 2/3 (FSDP2), or zero 0 with tensor parallelism (``replicate``), on the meta-built ``module``."""
    if mesh.shape.dp == 1:
        return
    dp_mesh = mesh.sub("dp")
    if zero in (2, 3):
        reshard = zero == 3
        for path in present(module, blocks):
            fully_shard(module.get_submodule(path), mesh=dp_mesh, reshard_after_forward=reshard)
        fully_shard(module, mesh=dp_mesh, reshard_after_forward=reshard)
    elif zero == 0 and _has_dtensors(module):
        replicate(module, mesh=dp_mesh)


def wrap_after_materialize(module: nn.Module, zero: int, mesh: RankMesh) -> nn.Module:
    """ZeRO 0/1 without tensor parallelism: the materialised ``module`` in DDP over the dp group."""
    if mesh.shape.dp == 1 or zero not in (0, 1) or isinstance(module, FSDPModule):
        return module
    device_ids = [mesh.device.index] if mesh.device.type == "cuda" else None
    return DistributedDataParallel(module, process_group=mesh.group("dp"), device_ids=device_ids,
                                   find_unused_parameters=mesh.shape.pp > 1)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the data-parallel gradient reduction inside the block unless ``enabled`` (accumulation)."""
    if enabled:
        yield
    elif isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def optimizer_class(training: TrainingSpec) -> type[torch.optim.Optimizer]:
    return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[training.optimizer]


def optimizer_kwargs(training: TrainingSpec) -> dict[str, object]:
    """Hyper-parameters of ``training.optimizer`` (betas only for Adam/AdamW)."""
    kwargs: dict[str, object] = {"lr": training.lr, "weight_decay": training.weight_decay}
    if training.optimizer in ("adam", "adamw"):
        kwargs["betas"] = tuple(training.betas)
    return kwargs


def make_optimizer(params: list[nn.Parameter], training: TrainingSpec, zero: int, mesh: RankMesh | None) -> torch.optim.Optimizer:
    """The spec's optimizer over ``params``; ZeRO-1 partitions its state over the dp group."""
    if zero == 1 and mesh is not None and mesh.shape.dp > 1:
        return ZeroRedundancyOptimizer(
            params, optimizer_class=optimizer_class(training), process_group=mesh.group("dp"), **optimizer_kwargs(training)
        )
    return optimizer_class(training)(params, **optimizer_kwargs(training))
