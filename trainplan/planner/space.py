"""The search space: every layout a spec admits, honouring each field the spec fixes.

A layout is ``dp × tp × pp = world size`` (Megatron-LM's 3-D parallelism, Narayanan et al.
2021 Sec. 2), a micro-batch size and count with ``micro_batch × num_microbatches × dp =
global_batch``, a schedule (with virtual stages for interleaving, which Megatron-LM requires to
divide the layers and the micro-batch count to be a multiple of ``pp``), a ZeRO stage, a
recompute policy and sequence parallelism (only meaningful with ``tp > 1``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from trainplan.ir.facts import TransformerFacts
from trainplan.ir.spec import AUTO, ParallelSpec


@dataclass(frozen=True, slots=True, order=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    num_microbatches: int
    schedule: str
    virtual_stages: int
    zero: int
    recompute: str
    sequence_parallel: bool

    def describe(self) -> str:
        sched = f"{self.schedule}(v={self.virtual_stages})" if self.schedule == "interleaved" else self.schedule
        sp = " sp" if self.sequence_parallel else ""
        return (
            f"dp={self.dp} tp={self.tp} pp={self.pp} mb={self.micro_batch}x{self.num_microbatches} "
            f"{sched} zero={self.zero} recompute={self.recompute}{sp}"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _allowed(fixed: object, options: list) -> list:
    return options if fixed == AUTO else [o for o in options if o == fixed]


def tp_degrees(world: int, facts: TransformerFacts | None) -> list[int]:
    """TP degrees that shard every layer evenly: heads, KV heads and the MLP must divide (Megatron-LM)."""
    if facts is None or not facts.tensor_parallel:
        return [1]
    return [
        t
        for t in divisors(world)
        if facts.heads % t == 0 and facts.kv_heads % t == 0 and facts.ffn_hidden % t == 0 and facts.hidden % t == 0
    ]


def schedules(pp: int, blocks: int, m: int, fixed: object = AUTO) -> list[tuple[str, int]]:
    """(schedule, virtual stages) pairs; 1F1B needs m >= pp, interleaving m % pp == 0 and blocks % (pp·v) == 0.

    With one stage there is no pipeline: micro-batches run one after another (gradient
    accumulation), which the plan records as 1F1B unless the spec fixed GPipe.
    """
    if pp == 1:
        return [("gpipe" if fixed == "gpipe" else "1f1b", 1)]
    # torch.distributed.pipelining's Schedule1F1B refuses fewer micro-batches than stages (torch 2.13)
    out = [("gpipe", 1)] + ([("1f1b", 1)] if m >= pp else [])
    if m % pp == 0 and blocks % pp == 0:
        out += [("interleaved", v) for v in divisors(blocks // pp) if v > 1]
    return out


def _sequence_parallel(tp: int, facts: TransformerFacts | None) -> list[bool]:
    """Sequence parallelism needs tp > 1 and a model whose layers the runtime can split by sequence."""
    return [False, True] if tp > 1 and (facts is None or facts.sequence_parallel) else [False]


def runtime_runs_comm(parallel: ParallelSpec, tp: int, pp: int, dp: int, zero: int) -> bool:
    """Whether the runtime executes the spec's fixed all-reduce, compression and sync mode on this
    layout (trainplan.runtime.data_parallel.check_data_parallel): our algorithms and compression are
    DDP hooks (ZeRO 0/1, tp = 1), and ZeRO 2/3 (FSDP2, tp = 1) takes our ring as its reduce-scatter,
    uncompressed; the parameter server and local SGD/async run plain data
    parallelism (tp = pp = 1, ZeRO 0), uncompressed."""
    if dp == 1 and not parallel.dedicated_ps_servers():  # dedicated servers serve even one worker
        return True
    own = parallel.allreduce == "ps" or parallel.sync in ("async", "local_sgd")
    if own:
        return tp == 1 and pp == 1 and zero == 0 and parallel.compression in (AUTO, "none")
    hooked = parallel.allreduce in ("ring", "tree", "hierarchical") or parallel.compression not in (AUTO, "none")
    fsdp_ring = parallel.allreduce == "ring" and parallel.compression in (AUTO, "none") and zero in (2, 3)
    return not hooked or (tp == 1 and (zero in (0, 1) or fsdp_ring))


def _zero_stages(tp: int) -> list[int]:
    """ZeRO stages the runtime can execute with this TP degree: ZeRO-1 is torch's
    ZeroRedundancyOptimizer, which cannot hold tensor-parallel (DTensor) parameters; ZeRO-2
    shards at least as much, so nothing is lost."""
    return [0, 1, 2, 3] if tp == 1 else [0, 2, 3]


def layouts(
    parallel: ParallelSpec,
    world: int,
    global_batch: int,
    units: int,
    blocks: int,
    facts: TransformerFacts | None,
) -> Iterator[Layout]:
    """Every layout admitted by the fixed fields of ``parallel``; ``units`` bounds the pipeline depth."""
    # Recomputation is costed from the transformer formulas; other models are planned without it.
    recomputes = ["none", "selective", "full"] if facts is not None else ["none"]
    for tp in _allowed(parallel.tp, tp_degrees(world, facts)):
        for pp in _allowed(parallel.pp, [p for p in divisors(world // tp) if p <= units]):
            dp = world // (tp * pp)
            if parallel.dp not in (AUTO, dp) or global_batch % dp:
                continue
            for mb in _allowed(parallel.micro_batch, divisors(global_batch // dp)):
                m = global_batch // (dp * mb)
                for sched, v in schedules(pp, blocks, m, parallel.schedule):
                    if parallel.schedule not in (AUTO, sched) or parallel.virtual_stages not in (AUTO, v):
                        continue
                    for zero in _allowed(parallel.zero, _zero_stages(tp)):
                        if not runtime_runs_comm(parallel, tp, pp, dp, zero):
                            continue
                        for rc in _allowed(parallel.recompute, recomputes):
                            for sp in _allowed(parallel.sequence_parallel, _sequence_parallel(tp, facts)):
                                yield Layout(tp, pp, dp, mb, m, sched, v, zero, rc, sp)
