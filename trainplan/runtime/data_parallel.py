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

Gradient exchange (``plan.allreduce``, ``plan.compression``, ``plan.comm``): on the DDP path
(ZeRO 0/1 without tensor parallelism) our ring / tree / hierarchical all-reduce and the fp16 / bf16
/ top-k / PowerSGD compression run as DDP communication hooks
(:mod:`trainplan.runtime.collectives`, :mod:`trainplan.runtime.compression`); their bytes on the
wire are counted per step. FSDP2 (ZeRO 2/3, and ``replicate`` under tensor parallelism)
reduce-scatters and takes no DDP hook; its equivalent, ``FSDPModule.set_custom_reduce_scatter``,
runs our ring's reduce-scatter half for ``allreduce: ring`` (tp = 1, uncompressed,
:mod:`~trainplan.runtime.collectives.fsdp`); other combinations are refused with the alternative
named. Local SGD
and the parameter server skip DDP and exchange on their own (:mod:`trainplan.runtime.sync_modes`).

Inside pipeline stages DDP runs with ``find_unused_parameters=True``: a schedule runs several
backward passes per step, and DDP's bucket rebuild after its first iteration then fails an
internal assert (torch 2.13); without the rebuild the reduction is the same.
FSDP2 shards every block (``ModuleList`` element) as its own unit, then the rest of the module.
FSDP and ``replicate`` are applied on the meta device, before :mod:`~trainplan.runtime.materialize`
allocates the local shards; DDP needs real tensors and wraps after it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from trainplan.ir.plan import Plan
from trainplan.ir.spec import TrainingSpec
from trainplan.runtime.collectives import CommHook, WireCounter
from trainplan.runtime.collectives.fsdp import RingReduceScatter
from trainplan.runtime.compression import CompressionOptions, compression_hook
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.mesh import RankMesh
from trainplan.runtime.structure import present


def _has_dtensors(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


DDP_ALGORITHMS = ("native", "ring", "tree", "hierarchical")
TOPK_ALGORITHMS = ("native", "ring")


def uses_ddp(plan: Plan) -> bool:
    """Whether the plan's data parallelism is DDP (ZeRO 0/1 without tensor parallelism), the path
    that takes communication hooks; ZeRO 2/3 and ``replicate`` (tp > 1) are FSDP2."""
    return plan.zero in (0, 1) and plan.mesh.tp == 1


def check_data_parallel(plan: Plan) -> None:
    """Refuse data-parallel options the runtime cannot execute, before any work.

    Ring, tree and hierarchical all-reduce and every compression run as DDP communication hooks, so
    they need the DDP path (ZeRO 0/1, tp = 1): FSDP2 reduce-scatters with the backend's own
    collective and takes no hook. Local SGD and the parameter server replace DDP with their own
    exchange and run on plain data parallelism (tp = pp = 1, ZeRO 0).
    """
    check_zero(plan.zero, plan.mesh.tp)
    if plan.mesh.dp == 1 and not plan.ps_servers_dedicated:
        return  # one replica: nothing is exchanged, every mode trains the same (dedicated servers still serve)
    if plan.sync == "async" and plan.allreduce != "ps":
        raise PlanExecutionError("sync: async needs a parameter server to absorb unsynchronised pushes; "
                                 "plan with allreduce: ps (comm.staleness bounds how far workers drift)")
    if plan.allreduce == "ps" or plan.sync != "sync":
        _check_own_exchange(plan)
        return
    if fsdp_ring(plan):
        return  # FSDP2's reduce-scatter runs as our ring (:mod:`~trainplan.runtime.collectives.fsdp`)
    if (plan.allreduce != "native" or plan.compression != "none") and not uses_ddp(plan):
        what = "tensor parallelism (FSDP2 replicate)" if plan.mesh.tp > 1 else f"zero: {plan.zero} (FSDP2)"
        raise PlanExecutionError(
            f"allreduce: {plan.allreduce} with compression: {plan.compression} runs as a DDP communication hook, "
            f"which {what} does not take (FSDP2 reduce-scatters with the backend's own collective); use zero 0 or 1 "
            "with tp 1, or allreduce: native and compression: none (zero 2/3 also take allreduce: ring, uncompressed)")
    if plan.compression == "topk" and plan.allreduce not in TOPK_ALGORITHMS:
        raise PlanExecutionError(f"compression: topk all-gathers sparse (index, value) pairs; use allreduce: ring or "
                                 f"native, not {plan.allreduce}")
    if plan.compression == "powersgd" and plan.allreduce != "native":
        raise PlanExecutionError(f"compression: powersgd uses torch's powerSGD_hook, whose all-reduces are the "
                                 f"backend's own; use allreduce: native, not {plan.allreduce}")
    if plan.allreduce == "hierarchical":
        local_size(plan)


def _check_own_exchange(plan: Plan) -> None:
    """Local SGD and the parameter server: plain data parallelism, uncompressed."""
    mode = "allreduce: ps" if plan.allreduce == "ps" else f"sync: {plan.sync}"
    if plan.mesh.tp > 1 or plan.mesh.pp > 1 or plan.zero != 0:
        raise PlanExecutionError(f"{mode} runs on plain data parallelism; plan with tp 1, pp 1 and zero 0 "
                                 f"(got tp {plan.mesh.tp}, pp {plan.mesh.pp}, zero {plan.zero})")
    if plan.compression != "none":
        raise PlanExecutionError(f"{mode} exchanges uncompressed tensors; plan with compression: none")
    if plan.allreduce == "ps" and plan.spec.training.precision == "fp16":
        raise PlanExecutionError("allreduce: ps does not run fp16 loss scaling (a skipped step needs every worker in "
                                 "lockstep); use precision bf16 or fp32")
    if plan.sync == "local_sgd" and plan.allreduce == "ps":
        raise PlanExecutionError("sync: local_sgd averages parameters with an all-reduce; use allreduce: native, "
                                 "ring, tree or hierarchical, not ps")
    if (plan.allreduce == "ps" and not plan.ps_servers_dedicated and plan.comm.ps_servers is not None
            and plan.comm.ps_servers > plan.mesh.dp):
        raise PlanExecutionError(f"comm.ps_servers ({plan.comm.ps_servers}) exceeds the {plan.mesh.dp} data-parallel "
                                 "ranks that can hold a shard; use at most dp")
    if plan.allreduce == "hierarchical":
        local_size(plan)


def fsdp_ring(plan: Plan) -> bool:
    """ZeRO 2/3 without tensor parallelism and ``allreduce: ring``, uncompressed: FSDP2 reduce-scatters
    the gradients with our ring's reduce-scatter half (``set_custom_reduce_scatter``)."""
    return plan.zero in (2, 3) and plan.mesh.tp == 1 and plan.allreduce == "ring" and plan.compression == "none" \
        and plan.sync == "sync"


def own_exchange(plan: Plan) -> bool:
    """Whether the replicas exchange on their own (local SGD, parameter server: :mod:`~trainplan.runtime.sync_modes`)."""
    return plan.ps_servers_dedicated > 0 or (plan.mesh.dp > 1 and (plan.allreduce == "ps" or plan.sync != "sync"))


def parse_straggler(text: str) -> tuple[int, float]:
    """``RANK:SECONDS`` of ``--straggler`` (a non-negative rank, a non-negative finite delay)."""
    rank, sep, seconds = text.partition(":")
    try:
        value = (int(rank), float(seconds)) if sep else None
    except ValueError:
        value = None
    if value is None or value[0] < 0 or not 0 <= value[1] < float("inf"):
        raise ValueError(f"expected RANK:SECONDS (e.g. 1:0.05), got {text!r}")
    return value


def straggle(straggler: tuple[int, float] | None, rank: int) -> None:
    """The straggler experiment (``--straggler RANK:SECONDS``): delay ``rank`` by SECONDS, once per step."""
    if straggler is not None and straggler[0] == rank:
        time.sleep(straggler[1])


def local_size(plan: Plan) -> int:
    """Data-parallel ranks per node for hierarchical all-reduce: ``comm.local_size``, or the ranks of a
    dp group that share a node (``gcd(dp, devices_per_node)``: the dp group of a tp = 1 layout is
    consecutive ranks, nodes are ``devices_per_node`` consecutive ranks)."""
    dp = plan.mesh.dp
    size = plan.comm.local_size or math.gcd(dp, plan.spec.cluster.devices_per_node)
    if dp % size:
        raise PlanExecutionError(f"comm.local_size ({size}) must divide dp ({dp}) for hierarchical all-reduce")
    return size


def comm_hook(plan: Plan, mesh: RankMesh, counter: WireCounter) -> CommHook | None:
    """The DDP communication hook the plan asks for (``None``: DDP's own all-reduce suffices)."""
    if plan.sync != "sync" or plan.allreduce == "ps" or (plan.allreduce == "native" and plan.compression == "none"):
        return None
    options = CompressionOptions(topk_ratio=plan.comm.topk_ratio, powersgd_rank=plan.comm.powersgd_rank,
                                 seed=plan.spec.training.seed)
    local = local_size(plan) if plan.allreduce == "hierarchical" else None
    return compression_hook(plan.compression, plan.allreduce, mesh.group("dp"), options=options, local_size=local,
                            timeout=timedelta(seconds=plan.collective_timeout_s), counter=counter)


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


def wrap_after_materialize(module: nn.Module, zero: int, mesh: RankMesh, hook: CommHook | None = None,
                           replicas_exchange: bool = False) -> nn.Module:
    """ZeRO 0/1 without tensor parallelism: the materialised ``module`` in DDP over the dp group, with
    ``hook`` as its communication hook. Not wrapped when the replicas exchange on their own
    (``replicas_exchange``: local SGD, parameter server)."""
    if mesh.shape.dp == 1 or zero not in (0, 1) or isinstance(module, FSDPModule) or replicas_exchange:
        return module
    device_ids = [mesh.device.index] if mesh.device.type == "cuda" else None
    ddp = DistributedDataParallel(module, process_group=mesh.group("dp"), device_ids=device_ids,
                                  find_unused_parameters=mesh.shape.pp > 1)
    if hook is not None:
        hook.register(ddp)
    return ddp


class DataParallelComm:
    """The communication hooks of this rank's DDP modules and the bytes they sent (one counter for
    every stage's hook; DDP's own all-reduce, without a hook, is not counted)."""

    def __init__(self) -> None:
        self.counter = WireCounter()
        self.hooks: list[CommHook] = []
        self.custom = False  # FSDP2 runs our ring reduce-scatter
        self._last = 0

    def hook(self, plan: Plan, mesh: RankMesh) -> CommHook | None:
        made = comm_hook(plan, mesh, self.counter)
        if made is not None:
            self.hooks.append(made)
        return made

    def bytes_sent(self) -> int:
        """Bytes this rank's hooks put on the wire so far (measured, or modeled for backend collectives)."""
        return self.counter.total_bytes

    def step_bytes(self, device: torch.device) -> int | None:
        """Bytes every rank's hooks sent since the last call, summed over ranks (collective: every rank
        calls it); ``None`` without hooks (DDP's own all-reduce is not counted)."""
        if not self.hooks and not self.custom:
            return None
        sent = self.counter.total_bytes
        total = torch.tensor([sent - self._last], dtype=torch.int64, device=device)
        self._last = sent
        dist.all_reduce(total)
        return int(total)

    def close(self) -> None:
        for made in self.hooks:
            made.close()
        self.hooks.clear()


def wrap_stages(local: dict[int, nn.Module], plan: Plan, mesh: RankMesh) -> tuple[dict[int, nn.Module], DataParallelComm]:
    """Each local stage wrapped for data parallelism (:func:`wrap_after_materialize`) with the plan's hook."""
    comm = DataParallelComm()
    own = own_exchange(plan)
    wrapped = {}
    for index, module in local.items():
        wraps = mesh.shape.dp > 1 and plan.zero in (0, 1) and not isinstance(module, FSDPModule) and not own
        wrapped[index] = wrap_after_materialize(module, plan.zero, mesh, comm.hook(plan, mesh) if wraps else None,
                                                replicas_exchange=own)
        if mesh.shape.dp > 1 and fsdp_ring(plan):
            reduce_scatter = RingReduceScatter(timedelta(seconds=plan.collective_timeout_s), comm.counter)
            for sub in module.modules():
                if isinstance(sub, FSDPModule):
                    sub.set_custom_reduce_scatter(reduce_scatter)
                    comm.custom = True
    return wrapped, comm


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
        # One flat bucket per owner rank: the updated shards are broadcast as dp messages, not one per parameter.
        return ZeroRedundancyOptimizer(
            params, optimizer_class=optimizer_class(training), process_group=mesh.group("dp"),
            parameters_as_bucket_view=True, **optimizer_kwargs(training)
        )
    return optimizer_class(training)(params, **optimizer_kwargs(training))
