"""Worker side of ``trainplan calibrate``: the framework's own time around the model's operators.

The operator table (:mod:`trainplan.runtime.op_bench`) is one process at full speed on plain
tensors. Training adds work that no operator accounts for, and on a CPU it runs on the same cores
as the model. Each probe times a small synthetic network with and without one mechanism, with
every rank at once, in interleaved rounds whose median it keeps (a shared machine's speed comes
and goes), and separates the framework's time from the collectives the mechanism sends:

* :func:`lockstep_pace`: the speed a worker keeps when all train in lockstep (time-sliced cores),
  and what a blocking collective adds to a step beyond its time alone;
* :func:`fsdp_unit_time`: per FSDP2 unit, what its all-gather, its reduce-scatter and its hooks add
  inside a training step;
* :func:`tp_overhead`: DTensor around each tensor-parallel layer, the vocabulary-parallel loss,
  and the optimizer's update of each DTensor parameter;
* :func:`recompute_overhead`: ``torch.utils.checkpoint``'s and the selective policy's own work per
  tensor a recomputed block saves for backward.

Every rank must call the first three (they run collectives over the whole group);
:func:`recompute_overhead` runs in one process, beside the operator table it is measured against.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainplan.runtime.local_workers import WorkerContext
from trainplan.runtime.op_bench import _SyntheticBlock


def barrier(ctx: WorkerContext) -> None:
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()



FSDP_UNITS = 4  # blocks of the synthetic network sharded as FSDP2 units in :func:`fsdp_unit_time`
FRAMEWORK_ROUNDS = 5  # rounds of :func:`fsdp_unit_time` and :func:`tp_overhead`; the median round is kept
QUICK_ROUNDS = 3  # the same, and of :func:`lockstep_pace`, under ``trainplan calibrate --quick``


def _timed_loop(ctx: WorkerContext, fn: Callable[[], object], steps: int) -> float:
    """Mean seconds of ``fn`` over ``steps`` back-to-back calls, every rank starting together."""
    barrier(ctx)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def fsdp_probe_networks() -> tuple[torch.nn.Module, dict[int, torch.nn.Module]]:
    """The FSDP probe's synthetic network (:class:`_SyntheticBlock` × ``FSDP_UNITS``, seed 0) plain,
    and ``fully_shard``-ed per block and at the root as the runtime runs ZeRO-3
    (``reshard_after_forward=True``) and ZeRO-2 (``False``), keyed by stage. Every rank must call it."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    plain = torch.nn.Sequential(*[_SyntheticBlock(64) for _ in range(FSDP_UNITS)])
    sharded = {}
    for zero, reshard in ((3, True), (2, False)):
        net = copy.deepcopy(plain)
        for block in net:
            fully_shard(block, reshard_after_forward=reshard)
        sharded[zero] = fully_shard(net, reshard_after_forward=reshard)
    return plain, sharded


def fsdp_unit_time(ctx: WorkerContext, steps: int = 10, rounds: int = FRAMEWORK_ROUNDS) -> dict[str, float]:
    """FSDP2's time per unit on this rank in a training step of one micro-batch, split into what its
    parameter all-gather, its gradient reduce-scatter and its own work (hooks, flat-buffer copies,
    resharding) each add: ``{"gather_s", "scatter_s", "hooks_s", "unit_bytes"}``. Every rank must call
    it: it shards over the whole group.

    The synthetic network (:class:`trainplan.runtime.op_bench._SyntheticBlock` × ``FSDP_UNITS``,
    small, so the fixed costs show) is timed plain and ``fully_shard``-ed three ways, as the runtime
    runs ZeRO-2/3 (:mod:`trainplan.runtime.data_parallel`): ZeRO-3 (``reshard_after_forward=True``:
    two all-gathers and a reduce-scatter per unit), ZeRO-2 (one all-gather and a reduce-scatter) and
    ZeRO-3 under ``set_requires_gradient_sync(False)`` (the micro-batches before the last: no
    reduce-scatter). Per unit: ``gather = t₃ − t₂``, ``scatter = t₃ − t₃,nosync``,
    ``hooks = t₃,nosync − t_plain − 2·gather``. Timed with every rank training at once, the
    collectives cost what they cost inside a step — on 4 processes sharing 2 cores about 4-6 ms
    per all-gather and 7-8 ms per reduce-scatter of a 67 kB unit, 2-3x the same collectives timed
    alone after a barrier (the ranks reach them at different times and wait descheduled).
    ``unit_bytes``: one unit's parameters. Each of ``rounds`` rounds times all four back to back and
    every figure is the median over the rounds (single timings moved by 2x between calls on a
    shared machine).
    """
    plain, sharded = fsdp_probe_networks()
    x = torch.randn(1, 32, 64)

    def train(model: torch.nn.Module) -> Callable[[], None]:
        return lambda: model(x).sum().backward()

    def accumulate() -> None:  # a micro-batch before the last: gradients stay unsharded, no reduce-scatter
        sharded[3].set_requires_gradient_sync(False)
        try:
            sharded[3](x).sum().backward()
        finally:
            sharded[3].set_requires_gradient_sync(True)

    variants = {"plain": train(plain), "zero3": train(sharded[3]), "zero2": train(sharded[2]), "nosync": accumulate}
    for run in variants.values():
        run()  # warm-up (FSDP2's lazy init)
    rows = []
    for _ in range(rounds):
        t = {name: _timed_loop(ctx, run, steps) / FSDP_UNITS for name, run in variants.items()}
        gather = t["zero3"] - t["zero2"]
        rows.append((gather, t["zero3"] - t["nosync"], t["nosync"] - t["plain"] - 2 * gather))
    gather, scatter, hooks = (max(0.0, statistics.median(column)) for column in zip(*rows))
    unit_bytes = sum(p.numel() * p.element_size() for p in plain[0].parameters())
    return {"gather_s": gather, "scatter_s": scatter, "hooks_s": hooks, "unit_bytes": float(unit_bytes)}


LOCKSTEP_STEPS = 16  # synthetic training steps per phase of :func:`lockstep_pace`
LOCKSTEP_ROUNDS = 9  # rounds of (alone, together, collectives alone, all computing); the medians are kept
# (single rounds range 0.25-0.40 on 4 processes / 2 cores; medians of 5 moved by ±5% between calls)


def lockstep_pace(ctx: WorkerContext, rounds: int = LOCKSTEP_ROUNDS) -> tuple[float, float, float] | None:
    """The fraction of its solo speed a CPU worker keeps when every worker trains in lockstep, that
    solo speed, and what a blocking collective adds to a step beyond its time alone.

    A synthetic data-parallel step: forward and backward of a generic 4-layer network
    (:class:`trainplan.runtime.op_bench._SyntheticBlock`, a few ms of work), an all-reduce of its
    gradients' size (DDP's), an Adam update and an all-gather of two numbers per rank (the runtime's
    per-step loss and memory report). Rank 0 first runs the compute alone while the others wait;
    then every rank runs whole steps; then the collectives alone; then every rank the compute
    with no collective. On rank 0 (``None`` elsewhere), each the median of ``rounds`` rounds
    (:data:`LOCKSTEP_ROUNDS`):

    * ``share = t_solo / (t_lockstep − t_collectives)``. Where the workers outnumber the cores this
      is well below ``cores / workers``: a worker that reaches a collective first waits,
      descheduled, for the slowest, the step runs at the pace of the worst-served worker, and gloo
      reduces the gradients on the same cores (4 workers on 2 cores: about 0.25-0.4, not 0.5). The
      planner divides the measured operator costs by it (``device.compute_share``).
    * ``t_solo``, seconds of one step's compute alone (``device.pace_reference_s``).
    * ``wait = (t_lockstep − t_free − t_collectives) / 2`` (``device.collective_wait_s``), with
      ``t_free`` the step's compute on every rank at once and no collective: what each of the
      step's two collectives adds beyond its time alone. A rank that blocks in a collective gives
      its core to the ranks still computing and, once the collective completes, waits for a time
      slice to get one back. On 4 processes / 2 cores it came to 4-7 ms per collective whatever the
      compute (3.6, 6.4, 5.9, 6.7 ms at 64, 256, 1024, 2048 tokens); alone in a step, a
      2-element all-reduce added 6.7-6.8 ms and the 1.1 MB one 8.7-9 ms beyond its time alone.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_SyntheticBlock(128) for _ in range(4)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    x = torch.randn(1, 256, 128)
    grads = torch.zeros(sum(p.numel() for p in model.parameters()))
    mine, everyone = torch.zeros(2), torch.zeros(2 * ctx.world_size)

    def compute() -> None:
        model(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def collectives() -> None:
        dist.all_reduce(grads)
        dist.all_gather_into_tensor(everyone, mine)

    def step() -> None:
        model(x).sum().backward()
        dist.all_reduce(grads)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.all_gather_into_tensor(everyone, mine)

    def timed(fn: Callable[[], None]) -> float:
        return _timed_loop(ctx, fn, LOCKSTEP_STEPS)

    for _ in range(2):
        step()
    shares, solos, waits = [], [], []
    for _ in range(rounds):
        solo = timed(compute) if ctx.rank == 0 else timed(lambda: None)
        together, alone, free = timed(step), timed(collectives), timed(compute)
        shares.append(min(1.0, solo / max(together - alone, solo)))
        solos.append(solo)
        waits.append(max(0.0, (together - free - alone) / 2))
    if ctx.rank != 0:
        return None
    return statistics.median(shares), statistics.median(solos), statistics.median(waits)


TP_DEGREE = 2  # tensor-parallel group size of :func:`tp_overhead` (pairs of ranks)
TP_BLOCKS = 4  # column- then row-parallel layer pairs in its synthetic network
TP_WIDTH, TP_TOKENS, TP_VOCAB = 64, 32, 128
TP_OPTIMIZERS = ("sgd", "adam", "adamw")


class _CopyToGroup(torch.autograd.Function):
    """Megatron's ``f`` (Shoeybi et al. 2019, Sec. 3): identity forward, all-reduce of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Megatron's ``g``: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # noqa: ANN001
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad, None


class _MegatronMLP(torch.nn.Module):
    """``x + down(relu(up(x)))``: a column-parallel then a row-parallel layer under tensor parallelism
    (Shoeybi et al. 2019, Sec. 3, the MLP), ``inner`` the up projection's width. With ``group``, plain
    tensors with Megatron's two all-reduces written out (``f`` before ``up``, ``g`` after ``down``):
    the same collectives at the same points as the DTensor version, without DTensor."""

    def __init__(self, width: int, inner: int, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, inner)
        self.down = torch.nn.Linear(inner, width)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return x + self.down(torch.relu(self.up(x)))
        inner = torch.relu(self.up(_CopyToGroup.apply(x, self.group)))
        return x + _ReduceFromGroup.apply(self.down(inner), self.group)


class _Edge(torch.nn.Module):
    """An embedding and an output head: vocabulary-parallel under tensor parallelism."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def _passes(ctx: WorkerContext, loss: Callable[[], torch.Tensor], steps: int,
            context: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext) -> tuple[float, float]:
    """(forward, backward) seconds of ``loss``: forward alone, then forward and backward, minus it;
    each pass inside ``context()``."""
    with context():
        for _ in range(2):
            loss().backward()
        barrier(ctx)
        start = time.perf_counter()
        for _ in range(steps):
            loss()
        forward = (time.perf_counter() - start) / steps
        barrier(ctx)
        start = time.perf_counter()
        for _ in range(steps):
            loss().backward()
    return forward, max(0.0, (time.perf_counter() - start) / steps - forward)


def _update(ctx: WorkerContext, model: torch.nn.Module, optimizer: str, steps: int) -> float:
    """Seconds of one ``optimizer`` step over ``model``'s parameters (their gradients already there)."""
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    opt = cls(model.parameters(), lr=1e-6)
    opt.step()
    return _timed_loop(ctx, opt.step, steps)


def _allreduce_s(ctx: WorkerContext, numel: int, group: dist.ProcessGroup, steps: int) -> float:
    buf = torch.zeros(numel)
    return _timed_loop(ctx, lambda: dist.all_reduce(buf, group=group), steps)


def tp_overhead(ctx: WorkerContext, steps: int = 10, rounds: int = FRAMEWORK_ROUNDS) -> dict[str, object] | None:
    """DTensor's own time under tensor parallelism, beyond compute and collectives, on this rank:
    ``{"module": [fwd, bwd], "loss": [fwd, bwd], "param_step": {optimizer: s}}``; ``None`` unless the
    group splits into pairs (an even world size).

    Tensor parallelism as the runtime runs it (``parallelize_module``, :mod:`trainplan.runtime.
    tensor_parallel`) turns each sharded layer's input and parameters into DTensors: every operator
    on them goes through DTensor's dispatch (sharding propagation, redistribution, wrapping), in
    Python, forward and backward — on a CPU about 1-2 ms per layer and micro-batch, against a
    few µs for the product itself at these sizes. Three numbers, each over ranks in pairs:

    * **module**: :data:`TP_BLOCKS` × (column-, row-parallel) layer pairs against the same network
      of plain tensors at one rank's width with Megatron's ``f`` and ``g`` as plain all-reduces at
      the same points (one forward, one backward per pair), per layer. Subtracting the all-reduces
      timed alone instead left nothing in some calibrations: on a time-sliced CPU a collective
      looped alone can take as long as DTensor's work around the ones inside the network;
    * **loss**: a vocabulary-parallel embedding and column-parallel head with the cross-entropy
      under ``loss_parallel`` against the same at one rank's vocabulary, minus their collectives
      (the embedding's output and the head's input gradient, and the loss's three per-token
      all-reduces, :data:`trainplan.planner.cost.comm.CROSS_ENTROPY_ALLREDUCES`) and two layers'
      module overhead;
    * **param_step**: per optimizer, one step over the TP network's DTensor parameters minus the
      same over the unsharded one's, per parameter tensor.

    Times are with every rank working at once; ``trainplan calibrate`` writes them at full speed
    (× ``compute_share``), as the planner divides every measured compute time by it. Each of
    ``rounds`` rounds times everything back to back and each figure is the median over the rounds
    (one round's forward / backward split moved by 2-5x between calls on a shared machine).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

    if ctx.world_size < TP_DEGREE or ctx.world_size % TP_DEGREE:
        return None
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size // TP_DEGREE, TP_DEGREE), mesh_dim_names=("dp", "tp"))["tp"]
    group = mesh.get_group()
    torch.manual_seed(0)
    inner = 2 * TP_WIDTH
    plain = torch.nn.Sequential(*[_MegatronMLP(TP_WIDTH, inner // TP_DEGREE, group) for _ in range(TP_BLOCKS)])
    sharded = torch.nn.Sequential(*[_MegatronMLP(TP_WIDTH, inner) for _ in range(TP_BLOCKS)])
    for block in sharded:
        parallelize_module(block, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    x = torch.randn(1, TP_TOKENS, TP_WIDTH)
    edge_plain, edge = _Edge(TP_VOCAB // TP_DEGREE, TP_WIDTH), _Edge(TP_VOCAB, TP_WIDTH)
    parallelize_module(edge, mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
    tokens = torch.randint(0, TP_VOCAB // TP_DEGREE, (1, TP_TOKENS))
    layers, tensors = 2 * TP_BLOCKS, sum(1 for _ in sharded.parameters())

    def one_round() -> list[float]:
        p_f, p_b = _passes(ctx, lambda: plain(x).sum(), steps)
        s_f, s_b = _passes(ctx, lambda: sharded(x).sum(), steps)
        activation = _allreduce_s(ctx, TP_TOKENS * TP_WIDTH, group, steps)
        module = (max(0.0, (s_f - p_f) / layers), max(0.0, (s_b - p_b) / layers))
        e_f, e_b = _passes(ctx, lambda: F.cross_entropy(edge_plain(tokens).flatten(0, 1), tokens.flatten()), steps)
        l_f, l_b = _passes(ctx, lambda: F.cross_entropy(edge(tokens).flatten(0, 1), tokens.flatten()), steps,
                           loss_parallel)
        scalars = _allreduce_s(ctx, TP_TOKENS, group, steps)
        loss = (max(0.0, l_f - e_f - activation - 3 * scalars - 2 * module[0]),
                max(0.0, l_b - e_b - activation - 2 * module[1]))
        steps_ = [max(0.0, (_update(ctx, sharded, name, steps) - _update(ctx, plain, name, steps)) / tensors)
                  for name in TP_OPTIMIZERS]
        return [*module, *loss, *steps_]

    figures = [statistics.median(column) for column in zip(*(one_round() for _ in range(rounds)))]
    return {"module": figures[0:2], "loss": figures[2:4], "param_step": dict(zip(TP_OPTIMIZERS, figures[4:]))}


# Entries of the synthetic block (:func:`trainplan.runtime.op_bench._synthetic_ops`) whose outputs the
# runtime's selective policy does not keep, so recomputes (aten view/_unsafe_view, mul, _softmax, add:
# none is in :data:`trainplan.runtime.recompute.SAVED_OPS`); the planner's SELECTIVE_SAVED_OPS agrees
# (tests/runtime/test_calibrate.py).
SELECTIVE_RECOMPUTED = frozenset({"view", "mul", "softmax", "add"})
RECOMPUTE_BLOCKS = 4
# Activation tensors one synthetic block call saves for backward, per op, as the planner counts them
# (``planner.model_costs.saved_tensor_count`` of the traced block: the norm's input, mean and rstd;
# each linear's input; the gelu, silu, softmax and relu tensors; both factors of the mul): the unit
# of the checkpointing machinery's cost (:func:`recompute_overhead`). tests/runtime/test_calibrate.py
# traces the block and checks it.
SYNTHETIC_SAVED_TENSORS = 11


def recompute_overhead(table: dict[str, dict[str, float]], device: torch.device, dtype: torch.dtype, *,
                       rounds: int = FRAMEWORK_ROUNDS, repeats: int = 7) -> dict[str, list[float]]:
    """Seconds per saved tensor of a checkpointed block that activation recomputation adds beyond
    the recomputed work itself, forward and backward: ``{"full": [fwd, bwd], "selective": [fwd, bwd]}``,
    on this process alone (at full speed, like the operator table ``table``, which
    :func:`trainplan.runtime.op_bench.apply_in_situ` made).

    ``torch.utils.checkpoint`` (non-reentrant) runs each checkpointed forward under saved-tensor
    hooks and, in the backward, the forward again, in Python; under ``selective`` a
    ``TorchDispatchMode`` also asks the policy about every aten op and caches or replays its output
    (:mod:`trainplan.runtime.recompute`). On a CPU at small sizes that machinery, not the recomputed
    arithmetic, dominates: for the catalogue GPT, selective recomputation measured slower than full.
    Timed here on the generic network (:class:`~trainplan.runtime.op_bench._SyntheticBlock` ×
    :data:`RECOMPUTE_BLOCKS`, at the first in-situ size) with the runtime's own
    :func:`~trainplan.runtime.recompute.apply_recompute` under each policy and without, as
    ``(t_policy − t_none − recomputed) / saved``, where ``recomputed`` is the table's forward of
    what the policy recomputes (every operator under ``full``, :data:`SELECTIVE_RECOMPUTED` under
    ``selective``) and ``saved`` counts the tensors the blocks' ops save for backward as the planner
    counts them (:data:`SYNTHETIC_SAVED_TENSORS` per block,
    ``planner.model_costs.saved_tensor_count``): the machinery handles saved tensors one by one, and
    a light operator that saves nothing (a view, an add) costs it next to nothing.
    The three run back to back in each of ``rounds`` rounds and each figure is the median round's;
    each round's differences are converted to the table's pace, the table's prediction of the
    plain network over its time in that round (the table was timed minutes earlier, and the
    machine's speed moves in between: without this, calibrations gave 11-22 µs per operator for
    ``full``'s forward where this process alone measures 11-12 µs).
    """
    from trainplan.runtime.op_bench import IN_SITU_SIZES, _act, _predicted, _synthetic_ops, network_phases
    from trainplan.runtime.recompute import apply_recompute

    tokens, width = IN_SITU_SIZES[0]
    ops = [op for op in _synthetic_ops(tokens, width) * RECOMPUTE_BLOCKS if op[0] != "module_call"]
    x = _act((1, tokens, width), device, dtype)
    models = {}
    for mode in ("none", "full", "selective"):
        torch.manual_seed(0)
        models[mode] = torch.nn.Sequential(*[_SyntheticBlock(width) for _ in range(RECOMPUTE_BLOCKS)]).to(device=device, dtype=dtype)
        apply_recompute(models[mode], mode, [str(i) for i in range(RECOMPUTE_BLOCKS)])  # type: ignore[arg-type]
    redo = {"full": ops, "selective": [op for op in ops if op[0] in SELECTIVE_RECOMPUTED]}
    recomputed = {mode: sum(_predicted(table, redo[mode], "fwd")) for mode in redo}
    network = _synthetic_ops(tokens, width) * RECOMPUTE_BLOCKS
    expected = [sum(_predicted(table, network, direction)) for direction in ("fwd", "bwd")]  # the table's "none"
    saved = SYNTHETIC_SAVED_TENSORS * RECOMPUTE_BLOCKS
    figures: dict[str, list[tuple[float, float]]] = {mode: [] for mode in redo}
    for _ in range(rounds):  # the three modes back to back in every round: a slow spell hits all of them
        times = {mode: network_phases(model, x, device, rounds=1, repeats=repeats) for mode, model in models.items()}
        # this round's pace against the table's: the differences in the table's seconds
        pace = [e / t for e, t in zip(expected, times["none"])]
        for mode in redo:
            figures[mode].append(((times[mode][0] - times["none"][0]) * pace[0] / saved,
                                  ((times[mode][1] - times["none"][1]) * pace[1] - recomputed[mode]) / saved))
    return {mode: [max(0.0, statistics.median(f for f, _ in rows)), max(0.0, statistics.median(b for _, b in rows))]
            for mode, rows in figures.items()}
