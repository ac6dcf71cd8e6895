"""The data-parallel gradient synchronisation of one layout: which all-reduce algorithm, what it
costs, and how much of it the backward does not hide (ZeRO 0/1 under DDP, ZeRO 2/3 under FSDP2,
a pipeline's stages one after the other), plus what its blocking collectives wait for a core on a
time-sliced CPU. Pure arithmetic over :mod:`trainplan.planner.cost`; units: seconds, bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from trainplan.planner import cost

if TYPE_CHECKING:
    from trainplan.planner.evaluate import Context, StageCost
    from trainplan.planner.model_costs import ModelCosts
    from trainplan.planner.space import Layout

DDP_BUCKET_BYTES = 25 * 2**20  # PyTorch DDP's default bucket_cap_mb (Li et al. 2020, Sec. 3.2.3)


def hookable(lay: Layout) -> bool:
    """Whether the runtime can run our all-reduce algorithms and compression for ``lay``: they are
    DDP communication hooks (ZeRO 0/1 without tensor parallelism; FSDP2 takes no hook)."""
    return lay.zero in (0, 1) and lay.tp == 1


def allreduce_options(ctx: Context, can_hook: bool) -> list[str]:
    """Algorithms the planner may choose among (the fixed one, when the spec fixes it)."""
    if ctx.allreduce != "auto":
        return [ctx.allreduce]
    if not can_hook or ctx.compression in ("topk", "powersgd") or ctx.sync in ("async", "local_sgd"):
        return ["ring"]  # planned as the backend's own (native); top-k/PowerSGD exchange natively
    return ["ring", "tree", "hierarchical"]


def choose_allreduce(ctx: Context, nbytes: float, dp: int, stride: int, can_hook: bool = True) -> tuple[str, float]:
    """The fixed algorithm, or the fastest of native/ring/tree/hierarchical by the alpha-beta model."""
    options = allreduce_options(ctx, can_hook)
    # Ties go to the simpler algorithm (the order above): hierarchical equals ring inside a node.
    best = min(options, key=lambda a: (cost.dp_allreduce_time_s(ctx.cluster, nbytes, dp, stride, a), options.index(a)))  # type: ignore[arg-type]
    chosen = best if ctx.allreduce != "auto" or best != "ring" else "native"
    return chosen, cost.dp_allreduce_time_s(ctx.cluster, nbytes, dp, stride, best)  # type: ignore[arg-type]


def allreduce_reason(ctx: Context, nbytes: float, dp: int, stride: int, chosen: str, can_hook: bool = True) -> str:
    """Why ``chosen``: the message size, whether the ring is latency- or bandwidth-bound there
    (its ``2(n-1)·α`` against ``2(n-1)/n·S/B``, Patarasuk & Yuan 2009), and every option's time."""
    link = cost.group_link(ctx.cluster, dp, stride)
    latency = 2 * (dp - 1) * link.latency
    bandwidth = 2 * (dp - 1) / dp * nbytes / link.bandwidth
    bound = "latency-bound" if latency > bandwidth else "bandwidth-bound"
    options = allreduce_options(ctx, can_hook)
    times = ", ".join(f"{a} {cost.dp_allreduce_time_s(ctx.cluster, nbytes, dp, stride, a) * 1e6:,.1f} us"  # type: ignore[arg-type]
                      for a in options)
    name = "native (the backend's ring)" if chosen == "native" else chosen
    why = "" if len(options) > 1 else (" (the only option: ZeRO 2/3 and tensor parallelism reduce through FSDP2, "
                                        "which takes no hook)" if not can_hook else " (the only option with this "
                                        "compression / sync mode)")
    return f"{name}: {_size(nbytes)} of gradients per step over {dp} ranks are {bound}; alpha-beta: {times}{why}"


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def dp_gradient_time(ctx: Context, params: float, lay: Layout, algo: str) -> float:
    """One step's gradient exchange of ``params`` elements: the plan's all-reduce, with compression
    (compressed bytes plus the compute to compress, :func:`cost.compressed_dp_time_s`,
    :func:`cost.compression_compute_time_s`); local SGD exchanges parameters every H steps instead."""
    algo = "ring" if algo == "native" else algo
    comm = ctx.comm
    if ctx.compression in ("none", "auto") or algo == "ps":
        seconds = cost.dp_allreduce_time_s(ctx.cluster, params * ctx.grad_bytes, lay.dp, lay.tp, algo,  # type: ignore[arg-type]
                                           ps_servers=comm.ps_servers)
    else:
        dev = ctx.cluster.device
        seconds = cost.compressed_dp_time_s(ctx.cluster, params, lay.dp, lay.tp, algo, ctx.compression,  # type: ignore[arg-type]
                                            dtype_bytes=ctx.grad_bytes, topk_ratio=comm.topk_ratio,
                                            powersgd_rank=comm.powersgd_rank)
        seconds += cost.compression_compute_time_s(params, ctx.compression, dtype_bytes=ctx.grad_bytes,  # type: ignore[arg-type]
                                                   memory_bandwidth=dev.memory_bandwidth,
                                                   peak_flops=dev.peak(ctx.dtype), powersgd_rank=comm.powersgd_rank)
    return seconds / comm.local_sgd_period if ctx.sync == "local_sgd" else seconds


class DpPhases(NamedTuple):
    """Where the exposed data-parallel time of a step lands in the runtime's phase timers
    (``trainplan.runtime.measure``), in seconds per step; what is left of the exposed time is the
    gradient sync proper (in the last micro-batch's backward, or after a pipeline's schedule)."""

    forward: float = 0.0  # inside the forward passes: FSDP2's parameter all-gathers before each one
    backward: float = 0.0  # inside every micro-batch's backward, not the sync: ZeRO-3's re-gathers
    update: float = 0.0  # inside the optimizer step: ZeRO-1's parameter broadcast


class DpExposed(NamedTuple):
    seconds: float  # exposed per step, the slowest stage's
    algo: str
    crosses_nodes: bool
    phases: DpPhases  # of ``seconds``, by the phase that holds it


def fsdp_phases(gathers: float, hooks: float, gathers_per_microbatch: int, exposed_fraction: float) -> DpPhases:
    """The forward's and the backward's parts of FSDP2's exposed parameter all-gathers (``gathers``,
    every micro-batch's) and its own per-unit work (``hooks``), of which ``exposed_fraction`` is not
    hidden behind compute (1 on gloo). One gather per micro-batch runs before its forward; ZeRO-3's
    second (``gathers_per_microbatch = 2``) before its backward. The per-unit work is split evenly
    between the two passes: timed apart on the calibration's synthetic network
    (``bench/fsdp_phases.py``: ZeRO-3 under ``set_requires_gradient_sync(False)`` less the plain
    network and a gather per pass; 4 gloo processes on 2 cores), the forward's share came out 0.36
    to 0.65 over six runs, 0.50 in the median one (docs/accuracy.md, ninth session)."""
    forward = gathers / gathers_per_microbatch + hooks / 2
    return DpPhases(exposed_fraction * forward, exposed_fraction * (gathers + hooks - forward), 0.0)


def dp_exposed(ctx: Context, lay: Layout, stages: list[StageCost], model: ModelCosts | None = None) -> DpExposed:
    """Exposed gradient synchronisation of the slowest stage, the algorithm used, whether it crosses
    nodes, and the phases that hold it (:class:`DpPhases`, the same stage's).

    ZeRO-1/2 reduce-scatter the gradients and all-gather the updated parameters: the same bytes as
    a ring all-reduce (Rajbhandari et al. 2020, Sec. 7.2). ZeRO-3 as trainplan's runtime runs it
    (FSDP2, ``reshard_after_forward=True``; :func:`cost.zero3_comm_time_s`) reduce-scatters the
    gradients once per step, overlapped with the backward like the buckets above, and all-gathers
    the parameters in the forward and again in the backward of every micro-batch — ``2·m`` gathers,
    the paper's 1.5x volume (Sec. 7.2.2) when ``m = 1`` — prefetched behind compute and exposed
    only beyond the ``m·(t_f + t_b)`` of compute they can hide behind.
    """
    if lay.dp == 1:
        return DpExposed(0.0, "native", False, DpPhases())
    crosses = not cost.group_fits_in_node(ctx.cluster.devices_per_node, lay.dp, lay.tp) and ctx.cluster.nodes > 1
    largest = max(s.params for s in stages)
    algo, _ = choose_allreduce(ctx, largest * ctx.grad_bytes, lay.dp, lay.tp, hookable(lay))
    link = cost.group_link(ctx.cluster, lay.dp, lay.tp)
    units = {id(s): fsdp_units(model, s) for s in stages} if model is not None else {}
    waits = ddp_waits(ctx, lay, model, algo) if ctx.cluster.backend == "gloo" else 0.0  # the same for every stage
    per_stage: dict[tuple[float, float, float, int], tuple[float, float, DpPhases]] = {}
    for params, fwd, bwd, k in {(s.params, s.fwd, s.bwd, units.get(id(s), 1)) for s in stages}:  # identical stages once
        grad = params * ctx.grad_bytes
        gathers_per_mb = 2 if lay.zero == 3 else 1
        hooks = 0.0
        if lay.zero in (2, 3):  # FSDP2 (trainplan.runtime.data_parallel): ring collectives, one per unit
            ar, gather = cost.zero3_comm_time_s(params * ctx.element_bytes, grad, lay.dp, link, lay.num_microbatches,
                                                collectives=k, gathers_per_microbatch=gathers_per_mb,
                                                native_scatter=algo != "ring")
            # FSDP2's own work around them per unit and micro-batch (calibrated; 0 in the presets)
            hooks = k * lay.num_microbatches * ctx.cluster.device.fsdp_unit_overhead / ctx.cluster.device.compute_share
        else:
            ar, gather = dp_gradient_time(ctx, params, lay, algo), 0.0
        after = cost.zero1_broadcast_time_s(params * ctx.element_bytes, lay.dp, link) if lay.zero == 1 else 0.0
        if ctx.cluster.backend == "gloo":
            # gloo moves and sums the bytes on the same CPU cores the model computes on: nothing hides it
            hidden_gather = 0.0
            exposed = ar + waits
        else:
            hidden_gather = min(gather + hooks, lay.num_microbatches * (fwd + bwd))
            exposed = cost.dp_overlap_exposed_time(ar, bwd, DDP_BUCKET_BYTES, grad)
        exposed += gather + hooks - hidden_gather
        fraction = 1.0 - hidden_gather / (gather + hooks) if gather + hooks > 0 else 0.0
        phases = fsdp_phases(gather, hooks, gathers_per_mb, fraction)
        per_stage[params, fwd, bwd, k] = (exposed, after, phases._replace(update=after))
    times = [per_stage[s.params, s.fwd, s.bwd, units.get(id(s), 1)] for s in stages]
    if ddp_syncs_in_chain(ctx, lay):  # DDP (no gathers): the stages' syncs add up, the broadcasts overlap
        after = max(a for _, a, _ in times)
        return DpExposed(sum(e for e, _, _ in times) + after, algo, crosses, DpPhases(update=after))
    exposed, after, phases = max(times, key=lambda t: t[0] + t[1])
    return DpExposed(exposed + after, algo, crosses, phases)


def ddp_waits(ctx: Context, lay: Layout, model: ModelCosts | None, algo: str) -> float:
    """Seconds per step that the gradient exchange's blocking collectives wait beyond their time alone
    on a CPU whose workers outnumber its cores (``device.collective_wait_s`` each, measured by
    ``trainplan calibrate``; 0 in the presets). ZeRO 0/1 only: FSDP2's collectives are calibrated as
    a training step pays them (``link.all_gather_latency`` / ``reduce_scatter_latency``).

    * The gradient exchange, once per step: the all-reduce DDP waits for at the end of the last
      micro-batch's backward, or the parameter server's push and pull; every H steps under local
      SGD; never under asynchronous training (no rendezvous).
    * Under DDP (synchronous, not a parameter server) with BatchNorm, once per micro-batch: the
      broadcast of rank 0's buffers (running statistics) DDP sends at the start of every forward
      (``broadcast_buffers``, its default).

    Measured on the catalogue CNN at dp=4, 2 micro-batches, 4 processes on 2 cores: the gradient
    sync took 10-13 ms of the step where its all-reduce alone took 6-7.5 ms, and each forward ran
    4 ms slower under DDP than without it (the buffer broadcast). ZeRO-1's parameter broadcast
    right after the update is not charged: the ranks arrive at it together, just out of the
    gradient sync (charging it put the four models' ZeRO-1 rows 11-18% under their measurements)."""
    wait = ctx.cluster.device.collective_wait_s
    if wait == 0 or lay.dp == 1 or lay.zero not in (0, 1) or ctx.sync == "async":
        return 0.0
    exchanges = 1 / ctx.comm.local_sgd_period if ctx.sync == "local_sgd" else 1.0
    ddp = ctx.sync in ("sync", "auto") and algo != "ps"  # "auto" plans sync
    buffers = lay.num_microbatches if ddp and lay.pp == 1 and model is not None and model.batch_statistics else 0
    return wait * (exchanges + buffers)


def ddp_syncs_in_chain(ctx: Context, lay: Layout) -> bool:
    """Whether a pipeline's data-parallel syncs run one after the other down the stages.

    Under DDP (ZeRO 0/1 without tensor parallelism, synchronous all-reduce) torch's pipelining
    lets DDP reduce a stage's gradients inside that stage's last backward
    (``PipelineStage.backward_maybe_with_nosync``), and the schedule sends the input gradient to
    the previous stage only when that backward returns: the last micro-batch's backward waits for
    every later stage's all-reduce, so the exposed syncs add up. FSDP2 (ZeRO 2/3, ``replicate``)
    reduces after the schedule (``perform_reduce_grad``), every stage at once: the slowest counts.
    Timed on gpt pp2-dp2 (GPipe, 4 processes): the last stage's final backward took 7 ms against
    1.5 ms for the others, and the first stage's gradient arrived only after it."""
    return lay.pp > 1 and lay.zero in (0, 1) and lay.tp == 1 and ctx.sync not in ("async", "local_sgd") and ctx.allreduce != "ps"


def fsdp_units(model: ModelCosts, stage: StageCost) -> int:
    """FSDP2 units of a stage as the runtime shards it: every block (ModuleList element) and the root."""
    blocks = sum(1 for first, last in stage.ranges for i in range(first, last + 1) if model.units[i].kind == "block")
    return blocks + 1
