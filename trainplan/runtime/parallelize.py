"""Build this rank's part of the model from a plan, composing the parallelisms in a fixed order.

1. build the whole model on ``meta`` (no memory) and note its tied parameters and blocks;
2. pipeline: cut it into the plan's stages and keep this rank's (:mod:`~trainplan.runtime.stages`);
3. tensor parallel: ``parallelize_module`` with the plan's styles, still on meta;
4. activation recomputation, then autocast, around the blocks' / stage's forward;
5. ZeRO 2/3 (FSDP2) or replicate on meta;
6. allocate and initialise only the local stages and shards (:mod:`~trainplan.runtime.materialize`);
7. ZeRO 0/1 without TP: wrap in DDP; build the optimizer (ZeRO-1 partitions it).

The order is torchtitan's (TP, then activation checkpointing, then data parallelism): DTensor
sharding must exist before FSDP shards it again, and the recompute wrapper must sit inside the
FSDP unit so its all-gathers happen once per forward and once per backward.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from trainplan.ir.plan import Plan
from trainplan.ir.spec import TaskSpec
from trainplan.models import resolve_task
from trainplan.runtime.data_parallel import (
    DataParallelComm,
    check_data_parallel,
    make_optimizer,
    shard_before_materialize,
    wrap_stages,
)
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.materialize import build_meta_model, check_buffers, materialize_local, model_aliases, retie_local
from trainplan.runtime.mesh import RankMesh
from trainplan.runtime.pipeline import TiedSync, check_schedule, local_stage_indices, tied_pairs, tied_sync
from trainplan.runtime.precision import autocast_forward
from trainplan.runtime.recompute import apply_recompute
from trainplan.runtime.stages import split_stages
from trainplan.runtime.structure import block_paths
from trainplan.runtime.tensor_parallel import apply_tensor_parallel, parallel_plan, resolve_styles, uses_loss_parallel


@dataclass
class RankModel:
    """What this rank trains: its stages (possibly wrapped), their optimizer and the run's options."""

    modules: dict[int, nn.Module]  # stage index -> module to call (DDP/FSDP-wrapped); {0: model} without pp
    inner: dict[int, nn.Module]  # the same stages unwrapped, parameter names as in the whole model
    optimizer: torch.optim.Optimizer
    task: TaskSpec
    loss_parallel: bool
    tied: TiedSync
    comm: DataParallelComm | None = None  # data-parallel hooks and their wire bytes

    def parameters(self) -> list[nn.Parameter]:
        """Every local parameter once."""
        return unique_parameters(self.inner.values())


def unique_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``modules``, each once, in order."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def check_plan(plan: Plan) -> None:
    """Refuse a plan the runtime cannot execute, before any process is started or group is made.

    Checks the layout options, then builds the model on meta (no memory) and checks the stage
    modules (they exist, and the model runs them in stage order) and the tensor-parallel styles.
    """
    check_layout(plan)
    built = build_meta_model(plan.spec)
    check_buffers(built.module)
    check_structure(plan, built.module, built.task)


def check_layout(plan: Plan) -> None:
    """Layout options the runtime cannot combine."""
    check_data_parallel(plan)
    if plan.mesh.pp > 1:
        check_schedule(plan)
    if plan.mesh.tp > 1 and not plan.tp_styles:
        raise PlanExecutionError(f"tp = {plan.mesh.tp} but tp_styles is empty: no module would be sharded")


def check_structure(plan: Plan, model: nn.Module, task: TaskSpec) -> None:
    """The plan's stage modules and tensor-parallel styles fit ``model`` (which is left unchanged)."""
    if plan.mesh.tp > 1:
        styles = resolve_styles(model, plan.tp_styles)
        parallel_plan(model, styles, task, sequence_parallel=plan.sequence_parallel, blocks=block_paths(model))
    if plan.mesh.pp > 1:
        split_stages(model, _ordered_stage_modules(plan))


def _ordered_stage_modules(plan: Plan) -> list[list[str]]:
    return [stage.modules for stage in sorted(plan.stages, key=lambda s: s.index)]


def _stage_modules(plan: Plan, model: nn.Module, mesh: RankMesh) -> tuple[dict[int, nn.Module], list[set[str]]]:
    """This rank's stage modules and the parameter names of every stage."""
    if plan.mesh.pp == 1:
        return {0: model}, [{n for n, _ in model.named_parameters(remove_duplicate=False)}]
    stages = split_stages(model, _ordered_stage_modules(plan))
    names = [{n for n, _ in s.named_parameters(remove_duplicate=False)} for s in stages]
    indices = local_stage_indices(mesh.pp_rank, plan.mesh.pp, plan.virtual_stages)
    return {i: stages[i] for i in indices}, names


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def build_rank_model(plan: Plan, mesh: RankMesh, model: nn.Module | None = None,
                     task: TaskSpec | None = None) -> RankModel:
    """This rank's stages, parallelised, materialised and with their optimizer.

    Without ``model`` the spec's model is built on meta. A given ``model`` on meta is initialised
    like the catalogue's (:mod:`~trainplan.runtime.materialize`); one with real weights keeps them
    (they must be equal on every rank: FSDP shards what each rank holds) and moves to the device.
    """
    check_layout(plan)
    if model is None:
        built = build_meta_model(plan.spec)
        model, task = built.module, built.task
    task = task or resolve_task(plan.spec.model, plan.spec.task)
    on_meta = _on_meta(model)
    if not on_meta:
        model.to(mesh.device)
    aliases, blocks = model_aliases(model), block_paths(model)
    styles = resolve_styles(model, plan.tp_styles) if plan.mesh.tp > 1 else {}
    tp_plan = parallel_plan(model, styles, task, sequence_parallel=plan.sequence_parallel, blocks=blocks) if styles else {}
    local, stage_names = _stage_modules(plan, model, mesh)
    for module in local.values():
        if tp_plan:
            apply_tensor_parallel(module, mesh.sub("tp"), tp_plan)
            retie_local(module, aliases)
        apply_recompute(module, plan.recompute, blocks)
        autocast_forward(module, plan.spec.training.precision, mesh.device)
        shard_before_materialize(module, plan.zero, mesh, blocks)
    if on_meta:
        materialize_local(list(local.values()), device=mesh.device, seed=plan.spec.training.seed, aliases=aliases)
    tied = tied_sync(tied_pairs(aliases, stage_names), mesh, local, plan.collective_timeout_s)
    wrapped, comm = wrap_stages(local, plan, mesh)
    optimizer = make_optimizer(unique_parameters(local.values()), plan.spec.training, plan.zero, mesh)
    return RankModel(wrapped, local, optimizer, task, uses_loss_parallel(model, styles, task), tied, comm)
