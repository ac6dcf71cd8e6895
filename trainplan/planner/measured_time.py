"""Time terms from the cluster's measured costs (``trainplan calibrate``): a unit's compute summed
operator by operator (plus DTensor's own work under tensor parallelism), the optimizer update per
parameter tensor, and the runtime's per-step bookkeeping collective. Used by
:mod:`trainplan.planner.evaluate`; pure arithmetic, no torch.

``ctx`` is an :class:`trainplan.planner.evaluate.Context` (cluster, dtype, optimizer), ``lay`` a
:class:`trainplan.planner.space.Layout`, ``stage`` an :class:`trainplan.planner.evaluate.StageCost`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainplan.planner import cost
from trainplan.planner.cost.ops import base_name, loss_time_s, ops_time_s
from trainplan.planner.model_costs import SELECTIVE_SAVED_OPS, ModelCosts, UnitCost
from trainplan.planner.space import Layout

if TYPE_CHECKING:
    from trainplan.planner.evaluate import Context, StageCost


def measured_compute(ctx: Context, u: UnitCost, lay: Layout, loss_bytes: float = 0.0) -> tuple[float, float] | None:
    """(forward, backward) compute seconds of ``u`` per micro-batch from the cluster's measured
    operator costs (:mod:`cost.ops`), or ``None`` when the device has none for the plan's dtype or
    the unit was not traced (then the roofline and kernel counts apply).

    Recomputation adds, to the backward, the forward of what the policy recomputes: every operator
    under ``full``; under ``selective`` those whose outputs the runtime's policy does not keep
    (:data:`model_costs.SELECTIVE_SAVED_OPS`); and the checkpointing machinery itself, per tensor the
    block's ops save for backward (``u.saved_tensors``, :func:`model_costs.saved_tensor_count`) and
    direction (``recompute:full`` / ``recompute:selective`` in the table,
    :func:`trainplan.runtime.calibrate_framework.recompute_overhead`). The last unit also runs the loss
    (:func:`cost.ops.loss_time_s`, ``loss_bytes / 4`` logits per sample, see
    :func:`model_costs.loss_saved_bytes`).
    """
    table = ctx.cluster.device.op_costs.get(ctx.dtype)  # type: ignore[call-overload]
    if not table or not u.ops:
        return None
    tp = lay.tp if _tp_divides(u) else 1
    fwd, bwd = ops_time_s(u.ops, table, lay.micro_batch, tp)
    if u.kind == "block" and lay.recompute == "full":
        bwd += fwd
    elif u.kind == "block" and lay.recompute == "selective":
        redo = frozenset(base_name(use.op) for use in u.ops) - SELECTIVE_SAVED_OPS
        bwd += ops_time_s(u.ops, table, lay.micro_batch, tp, only=redo)[0]
    machinery = table.get(f"recompute:{lay.recompute}") if u.kind == "block" else None
    if machinery is not None:  # torch.utils.checkpoint / the selective policy, per saved tensor
        fwd, bwd = fwd + u.saved_tensors * machinery.fwd_fixed_s, bwd + u.saved_tensors * machinery.bwd_fixed_s
    lf, lb = loss_time_s(table, loss_bytes / 4, lay.micro_batch, tp)
    df, db = dtensor_time(ctx, u, lay, loss=loss_bytes > 0)
    share = ctx.cluster.device.compute_share  # the table is one device at full speed; all of them run at once
    return (fwd + lf + df) / share, (bwd + lb + db) / share


def dtensor_time(ctx: Context, u: UnitCost, lay: Layout, loss: bool) -> tuple[float, float]:
    """(forward, backward) seconds of DTensor's own work in ``u`` per micro-batch under tensor
    parallelism, at full speed (``device.tp_overhead``, ``trainplan calibrate``): per tensor-parallel
    layer the unit calls (``u.tp_layers``), its forward again in the backward under full
    recomputation, and with ``loss`` the vocabulary-parallel cross-entropy when the unit's work is
    split (the LM head). 0 at tp = 1 and with the presets' zeros."""
    if lay.tp == 1:
        return 0.0, 0.0
    over = ctx.cluster.device.tp_overhead
    fwd, bwd = u.tp_layers * over.module_fwd_s, u.tp_layers * over.module_bwd_s
    if u.kind == "block" and lay.recompute == "full":
        bwd += fwd
    if loss and _tp_divides(u):
        fwd, bwd = fwd + over.loss_fwd_s, bwd + over.loss_bwd_s
    return fwd, bwd


def _tp_divides(u: UnitCost) -> bool:
    """Whether tensor parallelism divides any of ``u``'s operator work (some op has sharded units)."""
    return any(use.units_sharded for use in u.ops)


def optimizer_time(ctx: Context, model: ModelCosts, lay: Layout, stage: StageCost, shard: int) -> float:
    """Seconds of one optimizer update on a rank of ``stage``.

    With a measured ``optimizer:NAME`` entry (``trainplan calibrate``, per parameter tensor and
    element): tensors × fixed + elements × per element, the elements divided by the ZeRO shard;
    ZeRO-1 gives each rank whole tensors (``ZeroRedundancyOptimizer``), so it also divides the
    tensors, FSDP2 (ZeRO-2/3) shards every tensor, so each rank still updates all of them. Without
    it, a memory-bound pass (:func:`cost.optimizer_step_time_s`). Each DTensor parameter
    (:func:`dtensor_params`: tensor parallelism's, and every parameter under FSDP2) adds
    ``device.tp_overhead.param_step_s[optimizer]``, measured on tensor-parallel DTensors: the same
    dispatch, which on the bench's ZeRO-2/3 rows (4 processes, 2 cores) put the optimizer step at
    19-42 ms for gpt against 4-9 ms under DDP (docs/accuracy.md, ninth session).
    """
    table = ctx.cluster.device.op_costs.get(ctx.dtype, {})  # type: ignore[call-overload]
    measured = table.get(f"optimizer:{ctx.optimizer}")
    units = [model.units[i] for a, b in stage.ranges for i in range(a, b + 1)]
    tensors = sum(u.param_tensors for u in units)
    if measured is None or not tensors:
        update = cost.optimizer_step_time_s(stage.params / shard, ctx.precision, ctx.optimizer, ctx.cluster.device)
    else:
        per_rank = tensors / shard if lay.zero == 1 else tensors
        update = (per_rank * measured.fwd_fixed_s + stage.params / shard * measured.fwd_per_unit_s) / ctx.cluster.device.compute_share
    dtensors = dtensor_params(units, lay)
    if dtensors:  # every op of their update goes through DTensor's dispatch
        update += dtensors * ctx.cluster.device.tp_overhead.param_step_s.get(ctx.optimizer, 0.0) / ctx.cluster.device.compute_share
    return update


def dtensor_params(units: list[UnitCost], lay: Layout) -> float:
    """Parameter tensors of ``units`` that are DTensors on a rank under ``lay``: all of them under
    FSDP2 (ZeRO-2/3 shard every parameter over the data-parallel mesh,
    :mod:`trainplan.runtime.data_parallel`), else those tensor parallelism shards or replicates."""
    if lay.zero in (2, 3):
        return sum(u.param_tensors for u in units)
    return sum(u.tp_param_tensors for u in units) if lay.tp > 1 else 0


def step_bookkeeping_s(ctx: Context, lay: Layout) -> float:
    """The runtime's one collective per step outside the training math: an all-gather of every rank's
    (loss share, peak memory) pair, 16 bytes each (``trainplan.runtime.train.mean_loss_and_peak_memory``),
    so that every rank reports the global loss. Latency-bound: ``(n−1)·α`` (:func:`cost.all_gather_time_s`).
    0 where the replicas exchange on their own (local SGD, asynchronous, a parameter server:
    ``trainplan.runtime.sync_modes`` gathers its records once, after the last step).

    No ``device.collective_wait_s`` here, unlike the gradient sync: on the bench's gpt and cnn dp4
    rows (4 processes, 2 cores) the all-gather took 3.6-9.5 ms of each step against (n−1)·α =
    6.2 ms from a calibrated link, whose α, timed with every rank idle, already holds the
    scheduler's hand-offs; charging the wait as well left the three matrices' count within 20% as
    it was (95 of 108) and put this phase over its measurement (docs/accuracy.md, eighth session)."""
    world = lay.dp * lay.tp * lay.pp
    own_exchange = lay.dp > 1 and (ctx.allreduce == "ps" or ctx.sync in ("local_sgd", "async"))
    if world <= 1 or own_exchange:
        return 0.0
    link = cost.group_link(ctx.cluster, world, 1)
    return cost.all_gather_time_s(16.0 * world, world, link)
