"""Cost one layout: per-unit times and memory, stage partition, pipeline, gradient sync.

The composition of the cost functions in :mod:`trainplan.planner.cost` for one candidate; pure
arithmetic, no torch. Units: seconds, bytes, FLOPs.

Step time (Narayanan et al. 2021, Sec. 3): the pipeline's makespan over ``m`` micro-batches
(stage times from the partition; with ``pp = 1`` it is gradient accumulation, ``m·(t_f + t_b)``),
plus the part of the data-parallel gradient reduction the backward pass does not hide (Li et
al. 2020, bucketed overlap), plus, for ZeRO-3, parameter all-gathers that compute does not hide,
plus the optimizer update (memory-bound: its bytes per parameter over the memory bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from trainplan.ir.cluster import Cluster
from trainplan.ir.spec import CommSpec
from trainplan.planner import cost
from trainplan.planner.model_costs import ModelCosts, UnitCost
from trainplan.planner.gradient_sync import DpPhases, dp_exposed
from trainplan.planner.partition import Partition, partition, uniform_blocks
from trainplan.planner.measured_time import measured_compute, optimizer_time, step_bookkeeping_s
from trainplan.planner.space import Layout

COMPUTE_DTYPE = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True, slots=True)
class Context:
    """What every layout of one spec shares."""

    cluster: Cluster
    precision: str  # fp32 | bf16 | fp16
    optimizer: str
    global_batch: int
    tokens_per_sample: int
    allreduce: str  # fixed algorithm or "auto"
    compression: str = "none"  # fixed scheme ("auto" plans none)
    sync: str = "sync"  # fixed mode ("auto" plans sync)
    comm: CommSpec = field(default_factory=CommSpec)

    @property
    def dtype(self) -> str:
        return COMPUTE_DTYPE[self.precision]

    @property
    def element_bytes(self) -> int:
        return cost.dtype_bytes(self.dtype)

    @property
    def grad_bytes(self) -> int:
        """Bytes per gradient element on the wire: 16-bit in mixed precision (ZeRO's 2Ψ), else 4."""
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True, slots=True)
class UnitTimes:
    fwd: tuple[float, ...]  # seconds per micro-batch on one device
    bwd: tuple[float, ...]
    tp: tuple[float, ...]  # of which tensor-parallel communication
    acts: tuple[float, ...]  # bytes stored per micro-batch
    transient: tuple[float, ...]  # recompute working set
    params: tuple[float, ...]  # parameters on one device (TP-sharded)
    tp_degree: int  # the tensor-parallel degree the sharded parameters were divided by
    entry: tuple[float, ...] = ()  # bytes per micro-batch a stage starting at the unit holds again (model_costs.stage_entry_bytes)


@dataclass(frozen=True, slots=True)
class StageCost:
    ranges: tuple[tuple[int, int], ...]  # (first, last) unit of each chunk this pipeline rank holds
    device: int  # pipeline rank holding it
    fwd: float  # seconds per micro-batch, all chunks of the rank
    bwd: float
    params: float
    memory: cost.StageMemory
    chunk_fwd: tuple[float, ...] = ()  # seconds per micro-batch of each chunk in ``ranges`` (sum: ``fwd``)
    chunk_bwd: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Evaluation:
    layout: Layout
    fits: bool
    step_time: float
    stages: tuple[StageCost, ...]
    peak_memory: float
    peak_stage: int
    pipeline_s: float
    bubble_fraction: float
    dp_exposed_s: float
    optimizer_s: float
    tp_s: float
    pp_s: float
    p2p_s: float
    allreduce: str
    dp_crosses_nodes: bool
    compute_efficiency: float
    dp_phases: DpPhases = DpPhases()  # where ``dp_exposed_s`` lands in the runtime's phase timers


# --------------------------------------------------------------------------------- per unit


def _block(ctx: Context, u: UnitCost, lay: Layout, facts) -> tuple[float, float, float, float, float, float]:
    dev, dt, eb = ctx.cluster.device, ctx.dtype, ctx.element_bytes
    f = cost.transformer_layer_flops(facts, lay.micro_batch, lay.tp)
    eff = cost.transformer_layer_efficiency(facts, lay.micro_batch, lay.tp, dev, dt, dev.memory_bandwidth)
    link = cost.group_link(ctx.cluster, lay.tp, 1)
    tp_f, tp_b = cost.tp_comm_time_per_layer(facts, lay.micro_batch, lay.tp, link, lay.sequence_parallel, eb)
    rc = cost.recompute_flops(facts, lay.micro_batch, lay.tp, lay.recompute)  # type: ignore[arg-type]
    # Element-wise operators (norms, GeLU, softmax, dropout) stream the layer's activations through
    # memory: written once in the forward, read and their gradients written in the backward, and
    # written again when recomputed. Their bytes are the layer's stored activations (Korthikanti
    # et al. 2022, Table 2, no recomputation).
    streamed = cost.transformer_layer_activation_bytes(facts, lay.micro_batch, lay.tp, lay.sequence_parallel, "none", eb)
    elem = cost.memory_bound_time_s(streamed, dev)
    redo = {"none": 0.0, "selective": cost.recompute_transient_bytes(facts, lay.micro_batch, lay.tp, lay.sequence_parallel, "selective", eb), "full": streamed}[lay.recompute]
    kernels = cost.LAYER_FORWARD_KERNELS
    redo_kernels = {"none": 0, "selective": 4, "full": kernels}[lay.recompute]
    fwd = cost.compute_time_s(f, dev, dt, eff) + elem + cost.kernel_overhead_s(kernels, dev) + tp_f
    bwd = (
        cost.compute_time_s(cost.backward_flops(f) + rc, dev, dt, eff)
        + 2 * elem
        + cost.memory_bound_time_s(redo, dev)
        + cost.kernel_overhead_s(2 * kernels + redo_kernels, dev)
        + tp_b
    )
    measured = measured_compute(ctx, u, lay)
    if measured is not None:
        fwd, bwd = measured[0] + tp_f, measured[1] + tp_b
    tp_total = tp_f + tp_b
    if lay.recompute == "full":  # the recomputed forward repeats its all-reduces (Megatron-LM)
        bwd += tp_f
        tp_total += tp_f
    if u.activation_bytes > 0:  # traced: what the model's own ops save (cost.traced_activation_bytes)
        acts, transient = _traced_acts(u, lay)
    else:  # closed form (model_costs_from_facts): Korthikanti et al. 2022, Table 2
        acts = cost.transformer_layer_activation_bytes(facts, lay.micro_batch, lay.tp, lay.sequence_parallel, lay.recompute, eb)  # type: ignore[arg-type]
        transient = cost.recompute_transient_bytes(facts, lay.micro_batch, lay.tp, lay.sequence_parallel, lay.recompute, eb)  # type: ignore[arg-type]
    return fwd, bwd, tp_total, acts, transient, tp_local_params(u, lay.tp)


def _traced_acts(u: UnitCost, lay: Layout, recompute: str | None = None) -> tuple[float, float]:
    return cost.traced_activation_bytes(u.activation_bytes, u.act_tp_sharded, u.act_selective, u.act_selective_tp_sharded,
                                        u.act_full, lay.micro_batch, lay.tp, lay.sequence_parallel,
                                        recompute or lay.recompute)  # type: ignore[arg-type]


def tp_local_params(u: UnitCost, tp: int) -> float:
    """Parameters of ``u`` on one tensor-parallel rank: the sharded ones divided by ``tp``, the
    replicated ones (norms, row-parallel biases, learned positions) whole."""
    return (u.params - u.tp_replicated) / tp + u.tp_replicated


def _edge(ctx: Context, u: UnitCost, lay: Layout, facts, loss_bytes: float = 0.0) -> tuple[float, float, float, float, float, float]:
    """Embedding or LM head of a transformer: vocabulary-parallel (Shoeybi et al. 2019, Sec. 3).

    Their tensor-parallel communication is :func:`cost.tp_edge_comm_time`: the embedding
    all-reduces its output in the forward only, the LM head all-reduces its input gradient in the
    backward only (plus the parallel cross-entropy's per-token scalars in the forward).
    """
    dev, dt, eb, mb = ctx.cluster.device, ctx.dtype, ctx.element_bytes, lay.micro_batch
    link = cost.group_link(ctx.cluster, lay.tp, 1)
    tp_f, tp_b = cost.tp_edge_comm_time(u.kind, facts, mb, lay.tp, link, lay.sequence_parallel, eb)  # type: ignore[arg-type]
    traced = u.activation_bytes > 0 or loss_bytes > 0  # else closed form (Korthikanti et al. 2022, Sec. 4.3)
    if u.kind == "embedding":
        acts = _traced_acts(u, lay, "none")[0] if traced else cost.embedding_activation_bytes(facts, mb, lay.tp, lay.sequence_parallel)
        lookup_f, lookup_b = measured_compute(ctx, u, lay) or (0.0, 0.0)  # the lookup itself: free in the closed form
        return lookup_f + tp_f, lookup_b + tp_b, tp_f + tp_b, acts, 0.0, tp_local_params(u, lay.tp)
    f = cost.lm_head_flops(facts, mb, lay.tp)
    eff = cost.gemm_efficiency(dev, dt, mb * facts.seq_len, facts.vocab // lay.tp, facts.hidden, dev.memory_bandwidth)
    if traced:  # the head's saved tensors plus the vocabulary-parallel loss's fp32 log-softmax (divided by t)
        acts = _traced_acts(u, lay, "none")[0] + loss_bytes * mb / lay.tp
    else:
        acts = cost.output_layer_activation_bytes(facts, mb, lay.tp, lay.sequence_parallel, eb)
    # The final norm, the fp32 softmax and the cross-entropy stream these bytes: once forward, twice backward.
    elem = cost.memory_bound_time_s(acts, dev)
    fwd = cost.compute_time_s(f, dev, dt, eff)
    measured = measured_compute(ctx, u, lay, loss_bytes)
    if measured is not None:
        return measured[0] + tp_f, measured[1] + tp_b, tp_f + tp_b, acts, 0.0, tp_local_params(u, lay.tp)
    return fwd + elem + tp_f, 2 * (fwd + elem) + tp_b, tp_f + tp_b, acts, 0.0, tp_local_params(u, lay.tp)


def _other(ctx: Context, u: UnitCost, lay: Layout, loss_bytes: float = 0.0) -> tuple[float, float, float, float, float, float]:
    """A unit without transformer facts: measured FLOPs and bytes, replicated across TP.

    Plus the fixed cost of its kernels, which does not grow with the micro-batch: the traced
    graph's forward ops that launch work (``u.kernels``, :func:`model_costs.unit_kernels`) once in
    the forward and twice in the backward, ``device.kernel_launch`` each
    (:func:`cost.kernel_overhead_s`, the same rule as a transformer layer's kernels in :func:`_block`).
    """
    dev, dt, mb = ctx.cluster.device, ctx.dtype, lay.micro_batch
    fwd = cost.compute_time_s(u.flops_fwd * mb, dev, dt, dev.efficiency) + cost.kernel_overhead_s(u.kernels, dev)
    bwd = cost.compute_time_s(u.flops_bwd * mb, dev, dt, dev.efficiency) + cost.kernel_overhead_s(2 * u.kernels, dev)
    measured = measured_compute(ctx, u, lay, loss_bytes)
    if measured is not None:
        fwd, bwd = measured
    acts, transient = _traced_acts(u, lay, lay.recompute if u.kind == "block" else "none")
    return fwd, bwd, 0.0, acts + loss_bytes * mb, transient, u.params


def unit_times(model: ModelCosts, lay: Layout, ctx: Context) -> UnitTimes:
    """Per-unit costs of one layout; identical units (repeated blocks) are costed once."""
    rows, seen = [], {}
    last = len(model.units) - 1
    measured_ops = bool(ctx.cluster.device.op_costs.get(ctx.dtype))  # type: ignore[call-overload]
    for i, u in enumerate(model.units):
        loss = model.loss_bytes if i == last else 0.0  # the loss runs after the last unit
        key = (u.kind, u.params, u.tp_replicated, u.flops_fwd, u.flops_bwd, u.activation_bytes, u.kernels,
               u.act_tp_sharded, u.act_selective, u.act_selective_tp_sharded, u.act_full, loss,
               u.ops if measured_ops else (), u.tp_layers)
        if key not in seen:
            if model.facts is not None and u.kind == "block":
                seen[key] = _block(ctx, u, lay, model.facts)
            elif model.facts is not None and u.kind in ("embedding", "head"):
                seen[key] = _edge(ctx, u, lay, model.facts, loss)
            else:
                seen[key] = _other(ctx, u, lay, loss)
        rows.append(seen[key])
    cols = list(zip(*rows))
    sharded = lay.tp if model.facts is not None else 1
    # Without recomputation only: checkpointed blocks keep their inputs, which traced_activations counts.
    entry = tuple(u.act_entry * lay.micro_batch if lay.recompute == "none" else 0.0 for u in model.units)
    return UnitTimes(*(tuple(c) for c in cols), tp_degree=sharded, entry=entry)


# ------------------------------------------------------------------------------- stages


class _Prefix:
    """Prefix sums over units so any contiguous stage is costed in O(1)."""

    def __init__(self, model: ModelCosts, ut: UnitTimes) -> None:
        self.time = _acc([f + b for f, b in zip(ut.fwd, ut.bwd)])
        self.fwd, self.bwd = _acc(ut.fwd), _acc(ut.bwd)
        self.acts, self.params = _acc(ut.acts), _acc(ut.params)
        self.entry = ut.entry or (0.0,) * len(ut.acts)
        self.transient = max(ut.transient, default=0.0)
        self.blocks = _acc([1.0 if u.kind == "block" else 0.0 for u in model.units])
        self.shared = tuple((unit, owner, count / ut.tp_degree) for unit, owner, count in model.shared)

    def span(self, arr: list[float], i: int, j: int) -> float:
        return arr[j + 1] - arr[i]

    def stage_params(self, ranges: list[tuple[int, int]]) -> float:
        params = sum(self.span(self.params, i, j) for i, j in ranges)
        for unit, owner, count in self.shared:
            if _inside(unit, ranges) and not _inside(owner, ranges):
                params += count  # e.g. the LM head keeps its own copy of the tied embedding
        return params

    def stage_acts(self, ranges: list[tuple[int, int]]) -> float:
        """Activations per micro-batch of a stage: its units' spans, plus what each chunk that does
        not start the model receives and saves again (:func:`model_costs.stage_entry_bytes`)."""
        return sum(self.span(self.acts, i, j) + (self.entry[i] if i > 0 else 0.0) for i, j in ranges)

    def stage_transient(self, ranges: list[tuple[int, int]]) -> float:
        return self.transient if any(self.span(self.blocks, i, j) for i, j in ranges) else 0.0


def prefix_sums(model: ModelCosts, ut: UnitTimes) -> _Prefix:
    return _Prefix(model, ut)


def _inside(unit: int, ranges: list[tuple[int, int]]) -> bool:
    return any(i <= unit <= j for i, j in ranges)


def _acc(xs: list[float] | tuple[float, ...]) -> list[float]:
    out = [0.0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def _memory(ctx: Context, lay: Layout, px: _Prefix, ranges: list[tuple[int, int]], device: int) -> cost.StageMemory:
    params = px.stage_params(ranges)
    acts = px.stage_acts(ranges)
    in_flight = cost.in_flight_microbatches(lay.schedule, device, lay.pp, lay.num_microbatches, lay.virtual_stages)  # type: ignore[arg-type]
    state = cost.model_state_bytes(params, lay.zero, lay.dp, ctx.precision, ctx.optimizer)  # type: ignore[arg-type]
    return cost.StageMemory(
        device, state.params, state.grads, state.optimizer, acts * in_flight, px.stage_transient(ranges),
        float(ctx.cluster.device.memory_reserved),
    )


def _stage(ctx: Context, lay: Layout, px: _Prefix, ranges: list[tuple[int, int]], device: int) -> StageCost:
    fwd = tuple(px.span(px.fwd, i, j) for i, j in ranges)
    bwd = tuple(px.span(px.bwd, i, j) for i, j in ranges)
    mem = _memory(ctx, lay, px, ranges, device)
    return StageCost(tuple(ranges), device, sum(fwd), sum(bwd), px.stage_params(ranges), mem, fwd, bwd)


@lru_cache(maxsize=4096)
def _fastest_split(times: tuple[float, ...], pp: int) -> Partition | None:
    """The memory-blind optimal split; it depends only on the unit times, so layouts share it."""
    return partition(times, pp, rel_tol=1e-6)


def contiguous_stages(ctx: Context, lay: Layout, model: ModelCosts, px: _Prefix) -> tuple[list[StageCost], bool]:
    """GPipe / 1F1B / no pipeline: the optimal memory-feasible split, or the fastest one if none fits."""
    limit = float(ctx.cluster.device.memory)
    times = [px.span(px.time, i, i) for i in range(len(model.units))]

    # model_state_bytes is linear in the parameter count: one coefficient per layout keeps the
    # partition's many memory checks to a few additions.
    per_param = cost.model_state_bytes(1.0, lay.zero, lay.dp, ctx.precision, ctx.optimizer).total  # type: ignore[arg-type]
    in_flight = [
        cost.in_flight_microbatches(lay.schedule, k, lay.pp, lay.num_microbatches, lay.virtual_stages)  # type: ignore[arg-type]
        for k in range(lay.pp)
    ]
    budget = limit - float(ctx.cluster.device.memory_reserved)

    params, acts, blocks, shared, transient, entry = px.params, px.acts, px.blocks, px.shared, px.transient, px.entry

    def fits(k: int, i: int, j: int) -> bool:  # the partition's hot path: plain arithmetic
        held = params[j + 1] - params[i]
        for unit, owner, count in shared:
            if i <= unit <= j and not i <= owner <= j:
                held += count
        used = held * per_param + (acts[j + 1] - acts[i] + (entry[i] if i > 0 else 0.0)) * in_flight[k]
        if blocks[j + 1] > blocks[i]:
            used += transient
        return used <= budget

    # The fastest split ignoring memory is usually feasible; search under the memory limits only if not.
    fastest = _fastest_split(tuple(times), lay.pp)
    if fastest is None:
        return [], False
    stages = [_stage(ctx, lay, px, [b], k) for k, b in enumerate(fastest.bounds)]
    if all(s.memory.total <= limit for s in stages):
        return stages, True
    part = partition(times, lay.pp, fits, rel_tol=1e-6)
    if part is None:
        return stages, False
    return [_stage(ctx, lay, px, [b], k) for k, b in enumerate(part.bounds)], True


def interleaved_stages(ctx: Context, lay: Layout, model: ModelCosts, px: _Prefix) -> tuple[list[StageCost], bool]:
    """Interleaved 1F1B: blocks split evenly into ``pp·v`` chunks, chunk ``c`` on rank ``c mod pp``
    (Narayanan et al. 2021, Sec. 2.2.2); units before the first block join chunk 0, after the last the final chunk."""
    blocks = model.index_of("block")
    chunks = [(blocks[i], blocks[j]) for i, j in uniform_blocks(len(blocks), lay.pp * lay.virtual_stages)]
    chunks[0] = (0, chunks[0][1])
    chunks[-1] = (chunks[-1][0], len(model.units) - 1)
    stages = []
    for r in range(lay.pp):
        mine = chunks[r :: lay.pp]
        stages.append(_stage(ctx, lay, px, mine, r))
    limit = float(ctx.cluster.device.memory)
    return stages, all(s.memory.total <= limit for s in stages)


# --------------------------------------------------------------------------------- step


def p2p_seconds(ctx: Context, lay: Layout, model: ModelCosts) -> float:
    """One micro-batch's activation crossing a stage boundary (scatter/gather when TP > 1)."""
    if lay.pp == 1:
        return 0.0
    if model.facts is not None:
        nbytes = float(lay.micro_batch) * model.facts.seq_len * model.facts.hidden * ctx.element_bytes
    else:
        nbytes = max(u.output_bytes for u in model.units) * lay.micro_batch
    link = cost.group_link(ctx.cluster, lay.pp, lay.dp * lay.tp)
    intra = cost.group_link(ctx.cluster, lay.tp, 1)
    return cost.pipeline_p2p_time(nbytes, link, lay.tp, scatter_gather=lay.tp > 1, gather_link=intra)


def pipeline_waits(ctx: Context, lay: Layout) -> float:
    """Seconds a pipeline's transfers wait on a time-sliced CPU beyond their time alone: one
    ``device.collective_wait_s`` (:func:`gradient_sync.ddp_waits`) for each boundary crossing of the round trip
    the makespan charges transfers for, ``2·(pp·v − 1)``, as a receiving rank blocks in it like in
    a collective. Not one per transfer: a rank whose input has already arrived does not block.
    0 without a pipeline or off gloo.

    Measured on the bench's pp2-dp2 rows (``bench/estimate_accuracy.py``, 4 processes on 2 cores):
    without it, the bubble ran 17-37 ms against 11-12.5 ms estimated, forward and backward on
    their estimates, and the steps measured -5% to +40% over the estimate in two matrices (20 of 24
    rows above it); charging the wait on every simulated transfer instead came to +1% to -35% in
    the next matrix. With it, the three matrices' pipeline rows: docs/accuracy.md."""
    if lay.pp == 1 or ctx.cluster.backend != "gloo":
        return 0.0
    return 2 * (lay.pp * lay.virtual_stages - 1) * ctx.cluster.device.collective_wait_s


def pipeline_estimate(lay: Layout, stages: list[StageCost], p2p: float) -> float:
    """Fast makespan: exact for uniform stages without transfers (Narayanan et al. 2021, Sec. 2.2),
    and for any stages ``Σ_k (t_f + t_b)_k + (m − 1)·max_k (t_f + t_b)_k`` plus a round trip of
    transfers. The search refines its best candidates with the event simulation."""
    m = lay.num_microbatches
    per = [s.fwd + s.bwd for s in stages]
    if lay.pp == 1:
        return m * per[0]
    if lay.schedule == "interleaved":
        worst = max(range(len(stages)), key=lambda k: per[k])
        base = cost_uniform(lay, stages[worst].fwd, stages[worst].bwd)
        return base + 2 * (lay.pp * lay.virtual_stages - 1) * p2p
    return sum(per) + (m - 1) * max(per) + 2 * (lay.pp - 1) * p2p


def cost_uniform(lay: Layout, fwd: float, bwd: float) -> float:
    from trainplan.planner.schedule import uniform_step_time

    return uniform_step_time(lay.schedule, lay.pp, lay.num_microbatches, lay.virtual_stages, fwd, bwd)  # type: ignore[arg-type]


def tied_sync_s(ctx: Context, lay: Layout, px: _Prefix, stages: list[StageCost]) -> float:
    """Seconds per step of summing the gradients of parameters tied across pipeline ranks (an
    embedding and the LM head reading it): after the schedule, before the update, each pair of
    ranks holding a copy all-reduces its gradient (``trainplan.runtime.pipeline.TiedSync``, one
    pair after the other), a ring of 2 over the pipeline's link (:func:`cost.ring_allreduce_time_s`),
    per tensor-parallel shard. 0 without a pipeline or tied parameters."""
    if lay.pp == 1 or not px.shared:
        return 0.0
    link = cost.group_link(ctx.cluster, lay.pp, lay.dp * lay.tp)
    seconds = 0.0
    for unit, owner, count in px.shared:
        holders = {s.device for s in stages if _inside(unit, list(s.ranges)) or _inside(owner, list(s.ranges))}
        if len(holders) > 1:
            seconds += cost.ring_allreduce_time_s(count * ctx.grad_bytes, 2, link)
    return seconds


def evaluate(
    model: ModelCosts, lay: Layout, ctx: Context, ut: UnitTimes | None = None, px: "_Prefix | None" = None
) -> Evaluation:
    """Cost ``lay``; ``ut`` and its prefix sums ``px`` may be passed when already computed (they depend
    only on tp, micro-batch, recompute and sequence parallelism)."""
    ut = ut if ut is not None else unit_times(model, lay, ctx)
    px = px if px is not None else prefix_sums(model, ut)
    if lay.schedule == "interleaved":
        stages, fits = interleaved_stages(ctx, lay, model, px)
    else:
        stages, fits = contiguous_stages(ctx, lay, model, px)
    p2p = p2p_seconds(ctx, lay, model)
    pipe = pipeline_estimate(lay, stages, p2p) + pipeline_waits(ctx, lay)
    dp = dp_exposed(ctx, lay, stages, model)
    # The update runs after the gradients are in; ZeRO-1+ updates a 1/dp shard on each rank.
    shard = lay.dp if lay.zero >= 1 else 1
    opt_s = max(optimizer_time(ctx, model, lay, s, shard) for s in stages) + step_bookkeeping_s(ctx, lay)
    opt_s += tied_sync_s(ctx, lay, px, stages)
    return _evaluation(lay, fits, stages, pipe, dp, opt_s, p2p, ut, model, ctx)


def _evaluation(lay, fits, stages, pipe, dp, opt_s, p2p, ut, model, ctx) -> Evaluation:  # noqa: ANN001
    peak_stage = max(range(len(stages)), key=lambda k: stages[k].memory.total)
    busiest = max(s.fwd + s.bwd for s in stages)
    bubble = max(0.0, (pipe - lay.num_microbatches * busiest) / pipe) if pipe else 0.0
    heaviest = max(stages, key=lambda s: s.fwd + s.bwd)
    tp_s = lay.num_microbatches * sum(ut.tp[i] for a, b in heaviest.ranges for i in range(a, b + 1))
    flops = sum(u.flops_fwd + u.flops_bwd for u in model.units) * lay.micro_batch
    compute = sum(f + b for f, b in zip(ut.fwd, ut.bwd)) - sum(ut.tp)
    peak = ctx.cluster.device.peak(ctx.dtype)
    eff = flops / lay.tp / (compute * peak) if compute > 0 else 0.0
    pp_s = 2 * (lay.pp - 1) * p2p
    return Evaluation(
        lay, fits, pipe + dp.seconds + opt_s, tuple(stages), stages[peak_stage].memory.total, peak_stage, pipe, bubble,
        dp.seconds, opt_s, tp_s, pp_s, p2p, dp.algo, dp.crosses_nodes, eff, dp.phases,
    )
