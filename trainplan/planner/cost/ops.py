"""Compute time of a traced unit as the sum of its operators' measured costs (an operator-level model).

PALEO (Qi et al., ICLR 2017, Sec. 3) and Habitat (Yu et al., USENIX ATC 2021, Sec. 3) model a
network's step as the sum of per-layer / per-operator times measured or predicted on the target
device. Here each operator ``o`` of a unit costs, per micro-batch of ``b`` samples on a
tensor-parallel rank of ``t``::

    fwd(o) = fixed_fwd + per_unit_fwd · u(o)        bwd(o) = fixed_bwd + per_unit_bwd · u(o)
    u(o)   = b · (units_replicated + units_sharded / t) + units_constant

with ``fixed_*`` and ``per_unit_*`` from :class:`trainplan.ir.cluster.OpCost` (``trainplan
calibrate``), ``u`` in output elements or forward FLOPs, and the backward term only for operators
on the gradient path. Seconds throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainplan.ir.cluster import OpCost

# Table entries used for operators that were not measured: matrix products, element-wise ops and views.
FALLBACK = {"flop": "linear", "element": "add", "view": "view"}


@dataclass(frozen=True, slots=True)
class OpUse:
    """All calls of one operator in one unit, per sample (``units_*`` in the op's ``per`` units)."""

    op: str  # name as the front end records it ('linear', 'gelu', 'view', ...), then '[variant]' if any
    kind: str  # 'flop', 'element' or 'view' (no kernel: fixed cost only)
    grad: bool  # on the gradient path: has a backward
    calls: int
    units_replicated: float  # per sample, the same on every tensor-parallel rank
    units_sharded: float  # per sample, divided by the tensor-parallel degree
    units_constant: float  # independent of the batch (rotary tables, position ids)


def base_name(op: str) -> str:
    """``gelu[approximate=tanh]`` → ``gelu``: the operator without the string arguments that pick its kernel."""
    return op.split("[", 1)[0]


# Variants that name the kernel torch picks when an operator is fed one sample at a time
# (``conv2d[native]``, :func:`trainplan.passes.interpret._conv_variant`): from two samples on, the
# base entry applies.
SINGLE_SAMPLE_VARIANTS = frozenset({"native"})


def lookup(table: dict[str, OpCost], use: OpUse, micro_batch: int = 1) -> OpCost | None:
    """The measured cost of ``use.op`` (with its variant, else without), else the fallback entry of
    its kind, else ``None``. A single-sample variant counts only at a micro-batch of 1."""
    variant = use.op[len(base_name(use.op)) + 1:-1]
    own = table.get(use.op) if micro_batch == 1 or variant not in SINGLE_SAMPLE_VARIANTS else None
    return own or table.get(base_name(use.op)) or table.get(FALLBACK[use.kind])


def op_time_s(use: OpUse, cost: OpCost, micro_batch: int, tp: int) -> tuple[float, float]:
    """(forward, backward) seconds of ``use`` at ``micro_batch`` samples on a rank of ``tp``."""
    units = micro_batch * (use.units_replicated + use.units_sharded / tp) + use.units_constant
    if use.kind == "view":
        units = 0.0  # a view moves no data: its cost is the fixed part alone
    fwd = use.calls * cost.fwd_fixed_s + units * cost.fwd_per_unit_s
    bwd = use.calls * cost.bwd_fixed_s + units * cost.bwd_per_unit_s if use.grad else 0.0
    return fwd, bwd


def ops_time_s(uses: tuple[OpUse, ...], table: dict[str, OpCost], micro_batch: int, tp: int,
               only: frozenset[str] | None = None) -> tuple[float, float]:
    """(forward, backward) seconds of ``uses`` (those named in ``only`` when given).

    Raises ``KeyError`` naming the operator when neither it nor its fallback was measured.
    """
    fwd = bwd = 0.0
    for use in uses:
        if only is not None and base_name(use.op) not in only:
            continue
        cost = lookup(table, use, micro_batch)
        if cost is None:
            raise KeyError(f"no measured cost for operator {use.op!r} nor its fallback {FALLBACK[use.kind]!r}")
        f, b = op_time_s(use, cost, micro_batch, tp)
        fwd += f
        bwd += b
    return fwd, bwd


def loss_time_s(table: dict[str, OpCost], logits_per_sample: float, micro_batch: int, tp: int) -> tuple[float, float]:
    """(forward, backward) seconds of the cross-entropy over ``logits_per_sample`` elements per sample.

    The loss runs outside the traced model (``torch.nn.functional.cross_entropy`` on the model's
    output); vocabulary-parallel under tensor parallelism, so its elements divide by ``tp``. 0 when
    the table has no ``cross_entropy`` entry (it is then left out, as before calibration).
    """
    cost = table.get("cross_entropy")
    if cost is None or logits_per_sample <= 0:
        return 0.0, 0.0
    units = micro_batch * logits_per_sample / tp
    return cost.fwd_fixed_s + units * cost.fwd_per_unit_s, cost.bwd_fixed_s + units * cost.bwd_per_unit_s
