"""Pipeline parallelism with ``torch.distributed.pipelining``: stages, schedules, tied weights.

Stage ``i`` of ``pp * virtual_stages`` runs on pipeline rank ``i mod pp`` — rank ``r`` holds stages
``r, r + pp, r + 2pp, ...`` (one stage per rank unless the schedule is interleaved). The schedule
splits a replica's rows into ``num_microbatches`` equal micro-batches (the same cut as
:mod:`~trainplan.runtime.data`), computes each micro-batch's mean loss on the last stage and
divides the accumulated gradients by ``num_microbatches``, so a step minimises the replica's mean
loss exactly as the serial run does.

A parameter shared by two stages (an embedding tied to the LM head) exists once per holding rank;
both copies start equal (the same initial values) and stay equal because, after backward, the two
holders all-reduce (sum) its gradient — each holds the gradient of its own use — before the
optimizer steps (Megatron-LM's embedding group, Shoeybi et al. 2019).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from trainplan.ir.plan import Plan
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.mesh import RankMesh, new_group_with_timeout


def local_stage_indices(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """The stages pipeline rank ``pp_rank`` holds: ``pp_rank + k * pp`` for each model chunk ``k``."""
    return [pp_rank + k * pp for k in range(virtual_stages)]


def check_schedule(plan: Plan) -> None:
    """One stage per rank for GPipe and 1F1B; the interleaved schedule needs the micro-batches to fill the ranks."""
    if plan.schedule in ("gpipe", "1f1b") and plan.virtual_stages != 1:
        raise PlanExecutionError(
            f"schedule {plan.schedule!r} runs one stage per rank, but virtual_stages is {plan.virtual_stages}; "
            "use schedule: interleaved or virtual_stages: 1"
        )
    if plan.schedule == "interleaved" and plan.num_microbatches % plan.mesh.pp:
        raise PlanExecutionError(
            f"the interleaved schedule needs num_microbatches ({plan.num_microbatches}) to be a multiple of "
            f"pp ({plan.mesh.pp})"
        )


@dataclass(frozen=True)
class TiedPair:
    """A parameter held by two stages: its name on each, and the stages."""

    canonical: str
    alias: str
    canonical_stage: int
    alias_stage: int


def tied_pairs(aliases: dict[str, str], stage_params: Sequence[set[str]]) -> list[TiedPair]:
    """Tied parameters whose two names live in different stages (``stage_params``: names per stage)."""
    def stage_of(name: str) -> int | None:
        return next((i for i, names in enumerate(stage_params) if name in names), None)

    pairs = []
    for alias, canonical in sorted(aliases.items()):
        a, b = stage_of(canonical), stage_of(alias)
        if a is not None and b is not None and a != b:
            pairs.append(TiedPair(canonical, alias, a, b))
    return pairs


@dataclass
class TiedSync:
    """This rank's tied parameters and the two-rank groups in which their gradients are summed."""

    members: list[tuple[nn.Parameter, dist.ProcessGroup]]

    def all_reduce(self) -> None:
        for param, group in self.members:
            if param.grad is None:
                continue
            if isinstance(param.grad, DTensor) and param.grad.placements != param.placements:
                # e.g. a vocab-parallel embedding's gradient comes back replicated; take this rank's rows
                param.grad = param.grad.redistribute(param.device_mesh, param.placements)
            grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            dist.all_reduce(grad, group=group)


def tied_sync(pairs: list[TiedPair], mesh: RankMesh, stages: dict[int, nn.Module], timeout_s: float) -> TiedSync:
    """Create the groups of every tied pair (all ranks, same order) and keep this rank's members."""
    pp = mesh.shape.pp
    members = []
    for pair in pairs:
        a, b = pair.canonical_stage % pp, pair.alias_stage % pp
        if a == b:
            raise PlanExecutionError(
                f"tied parameters {pair.canonical!r} and {pair.alias!r} are on two model chunks of one pipeline rank; "
                "place them on the same stage or on different ranks"
            )
        for dp in range(mesh.shape.dp):
            for tp in range(mesh.shape.tp):
                ranks = [mesh.shape.rank(a, dp, tp), mesh.shape.rank(b, dp, tp)]
                group = new_group_with_timeout(ranks, timeout_s)
                if mesh.rank in ranks:
                    members.append((_param(stages, pair), group))
    return TiedSync(members)


def _param(stages: dict[int, nn.Module], pair: TiedPair) -> nn.Parameter:
    for index, name in ((pair.canonical_stage, pair.canonical), (pair.alias_stage, pair.alias)):
        if index in stages:
            return dict(stages[index].named_parameters())[name]
    raise PlanExecutionError(f"internal error: no local stage holds {pair.canonical!r}")


def build_schedule(plan: Plan, stages: list[PipelineStage], loss_fn: Callable[..., torch.Tensor]) -> object:
    """The plan's schedule over this rank's stages."""
    n = plan.num_microbatches
    if plan.schedule == "gpipe":
        return ScheduleGPipe(stages[0], n, loss_fn=loss_fn)
    if plan.schedule == "1f1b":
        return Schedule1F1B(stages[0], n, loss_fn=loss_fn)
    return ScheduleInterleaved1F1B(stages, n, loss_fn=loss_fn)


class PipelineRunner:
    """Runs one training step of this rank's stages under the plan's schedule."""

    def __init__(self, plan: Plan, mesh: RankMesh, modules: dict[int, nn.Module],
                 loss_fn: Callable[..., torch.Tensor], loss_context: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        num_stages = plan.mesh.pp * plan.virtual_stages
        self.stages = [
            PipelineStage(module, index, num_stages, mesh.device, group=mesh.group("pp"))
            for index, module in sorted(modules.items())
        ]
        self.holds_first = 0 in modules
        self.holds_last = num_stages - 1 in modules
        self.schedule = build_schedule(plan, self.stages, loss_fn)
        self.loss_context = loss_context

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
        """Forward and backward of every micro-batch; the per-micro-batch losses on the last stage, else []."""
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.holds_first else ()
        target = targets if self.holds_last else None
        with self.loss_context():
            self.schedule.step(*args, target=target, losses=losses if self.holds_last else None)  # type: ignore[attr-defined]
        return losses
