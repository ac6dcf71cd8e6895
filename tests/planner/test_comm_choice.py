"""The planner's data-parallel communication: the algorithm it picks and why, layouts the runtime
can execute for a fixed all-reduce / compression / sync mode, and the cost of compression."""

from __future__ import annotations

import pytest

from trainplan.ir.cluster import expand_preset
from trainplan.ir.loading import validate
from trainplan.ir.cluster import Cluster
from trainplan.ir.spec import ParallelSpec
from trainplan.planner import cost
from trainplan.planner.evaluate import Context
from trainplan.planner.gradient_sync import allreduce_reason, choose_allreduce
from trainplan.planner.space import layouts, runtime_runs_comm


def _ctx(**kw: object) -> Context:
    cluster = validate(Cluster, expand_preset({"preset": "a100-80g", "nodes": 2}))
    return Context(cluster, "bf16", "adam", 64, 1, **kw)  # type: ignore[arg-type]


def test_small_gradients_pick_tree_and_say_they_are_latency_bound() -> None:
    ctx = _ctx(allreduce="auto")
    algo, _ = choose_allreduce(ctx, 4096, 16, 1)
    assert algo == "tree"
    reason = allreduce_reason(ctx, 4096, 16, 1, algo)
    assert reason.startswith("tree: 4.0 KiB of gradients per step over 16 ranks are latency-bound")
    big, _ = choose_allreduce(ctx, 2**30, 16, 1)
    assert big in ("native", "hierarchical") and "bandwidth-bound" in allreduce_reason(ctx, 2**30, 16, 1, big)


def test_fsdp_layouts_get_the_backends_all_reduce() -> None:
    ctx = _ctx(allreduce="auto")
    assert choose_allreduce(ctx, 4096, 16, 1, can_hook=False)[0] == "native"
    assert "FSDP2" in allreduce_reason(ctx, 4096, 16, 1, "native", can_hook=False)


DDP = lambda tp, pp, zero: tp == 1 and zero in (0, 1)  # noqa: E731 - hooks need DDP
PLAIN = lambda tp, pp, zero: tp == 1 and pp == 1 and zero == 0  # noqa: E731 - own exchange


RING = lambda tp, pp, zero: tp == 1  # noqa: E731 - DDP hook, or FSDP2's custom reduce-scatter


@pytest.mark.parametrize(("fixed", "runs"), [
    (dict(allreduce="ring"), RING), (dict(allreduce="tree"), DDP), (dict(compression="topk"), DDP),
    (dict(allreduce="ps"), PLAIN),
    (dict(sync="local_sgd"), PLAIN),
])
def test_space_proposes_only_what_the_runtime_runs(fixed: dict, runs) -> None:  # noqa: ANN001
    every = {(lay.tp, lay.pp, lay.zero) for lay in layouts(ParallelSpec(), 8, 64, 6, 4, None) if lay.dp > 1}
    seen = {(lay.tp, lay.pp, lay.zero) for lay in layouts(ParallelSpec(**fixed), 8, 64, 6, 4, None) if lay.dp > 1}
    assert seen == {layout for layout in every if runs(*layout)}
    assert not runtime_runs_comm(ParallelSpec(allreduce="ps", compression="fp16"), 1, 1, 8, 0)


def test_compression_counts_fewer_bytes_and_its_compute() -> None:
    cluster = validate(Cluster, expand_preset({"preset": "a100-80g", "nodes": 2}))
    numel = 10**8
    plain = cost.dp_allreduce_time_s(cluster, numel * 4, 16, 8, "ring")
    half = cost.compressed_dp_time_s(cluster, numel, 16, 8, "ring", "fp16")
    assert half < plain and half == pytest.approx(cost.dp_allreduce_time_s(cluster, numel * 2, 16, 8, "ring"))
    topk = cost.compressed_dp_time_s(cluster, numel, 16, 8, "ring", "topk", topk_ratio=0.01)
    assert topk < half
    dev = cluster.device
    cast = cost.compression_compute_time_s(numel, "fp16", memory_bandwidth=dev.memory_bandwidth, peak_flops=1e12)
    assert cast == pytest.approx(numel * 12 / dev.memory_bandwidth)  # read 4 + write 2, then back
    assert cost.compression_compute_time_s(numel, "powersgd", memory_bandwidth=None, peak_flops=1e12,
                                           powersgd_rank=2) == pytest.approx(6 * 2 * numel / 1e12)
    assert cost.compression_compute_time_s(numel, "none", memory_bandwidth=None, peak_flops=1e12) == 0.0
