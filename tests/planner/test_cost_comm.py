"""Communication model: alpha-beta collectives, link choice, DP overlap, TP/PP traffic, compression."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainplan.ir.cluster import load_preset
from trainplan.ir.facts import TransformerFacts
from trainplan.planner.cost import comm as cm

NVLINK = cm.LinkCost(300e9, 5e-6, "intra")
IB = cm.LinkCost(25e9, 10e-6, "inter")
DGX4 = load_preset("a100-80g", nodes=4)


def test_ring_allreduce_formula() -> None:
    s, n = 1e9, 8
    assert cm.ring_allreduce_time_s(s, n, NVLINK) == pytest.approx(2 * 7 / 8 * s / 300e9 + 2 * 7 * 5e-6)
    assert cm.ring_allreduce_time_s(s, 1, NVLINK) == 0.0
    assert cm.ring_allreduce_time_s(0, 8, NVLINK) == pytest.approx(14 * 5e-6)


def test_tree_and_native() -> None:
    s, n = 1e9, 16
    assert cm.tree_allreduce_time_s(s, n, IB) == pytest.approx(2 * 4 * 10e-6 + 2 * s / 25e9)
    # Small messages: the tree's fewer latency steps win; large: the ring's 2(n-1)/n < 2 wins.
    small, large = 1e3, 1e10
    n = 4
    assert cm.allreduce_time_s(small, n, IB, "native") == cm.tree_allreduce_time_s(small, n, IB)
    assert cm.allreduce_time_s(large, n, IB, "native") == cm.ring_allreduce_time_s(large, n, IB)
    with pytest.raises(ValueError, match="single-level"):
        cm.allreduce_time_s(1.0, 4, IB, "hierarchical")  # type: ignore[arg-type]


def test_reduce_scatter_plus_all_gather_is_a_ring_allreduce() -> None:
    s, n = 3e8, 8
    rs_ag = cm.reduce_scatter_time_s(s, n, IB) + cm.all_gather_time_s(s, n, IB)
    assert rs_ag == pytest.approx(cm.ring_allreduce_time_s(s, n, IB))
    assert cm.reduce_scatter_time_s(s, n, IB) == pytest.approx(7 / 8 * s / 25e9 + 7 * 10e-6)


@settings(max_examples=60, deadline=None)
@given(s=st.floats(0, 1e10), n=st.integers(2, 512), ag=st.floats(0, 1e-2), rs=st.floats(0, 1e-2))
def test_native_collectives_pay_their_measured_latency(s: float, n: int, ag: float, rs: float) -> None:
    """torch.distributed's own all-gather / reduce-scatter pay the link's measured per-collective latency
    (gloo's reduce-scatter costs about an all-reduce); trainplan's point-to-point rings (``native=False``,
    the hierarchical all-reduce's phases) and a link without the figures pay its ``latency``."""
    measured = cm.LinkCost(NVLINK.bandwidth, NVLINK.latency, "intra", ag, rs)
    volume = (n - 1) / n * s / NVLINK.bandwidth
    assert cm.all_gather_time_s(s, n, measured) == pytest.approx(volume + (n - 1) * ag)
    assert cm.reduce_scatter_time_s(s, n, measured) == pytest.approx(volume + (n - 1) * rs)
    for native in (True, False):
        assert cm.all_gather_time_s(s, n, NVLINK, native=native) == pytest.approx(volume + (n - 1) * NVLINK.latency)
    assert cm.reduce_scatter_time_s(s, n, measured, native=False) == cm.reduce_scatter_time_s(s, n, NVLINK)
    assert cm.hierarchical_allreduce_time_s(s, n, 2, measured, IB) == cm.hierarchical_allreduce_time_s(s, n, 2, NVLINK, IB)
    rings = cm.zero3_comm_time_s(s, s, n, measured, 2, collectives=3, native_scatter=False)
    assert rings[0] == pytest.approx(3 * cm.reduce_scatter_time_s(s / 3, n, NVLINK))
    assert rings[1] == pytest.approx(2 * 2 * 3 * cm.all_gather_time_s(s / 3, n, measured))


def test_group_link_carries_the_measured_collective_latencies() -> None:
    c = DGX4.model_copy(update={"inter_node": DGX4.inter_node.model_copy(update={"reduce_scatter_latency": 1e-3})})
    inter, intra = cm.group_link(c, 32, 1), cm.group_link(c, 8, 1)
    assert (inter.level, inter.reduce_scatter_latency, inter.all_gather_latency) == ("inter", 1e-3, None)
    assert (intra.level, intra.reduce_scatter_latency) == ("intra", None)
    assert cm.reduce_scatter_time_s(1e6, 32, inter) > cm.reduce_scatter_time_s(1e6, 32, cm.group_link(DGX4, 32, 1))


def test_p2p() -> None:
    assert cm.p2p_time_s(25e9, IB) == pytest.approx(1.0 + 10e-6)
    with pytest.raises(ValueError, match="non-negative"):
        cm.p2p_time_s(-1, IB)


def test_hierarchical_is_its_three_phases() -> None:
    s, local, nodes = 1e9, 8, 4
    got = cm.hierarchical_allreduce_time_s(s, local, nodes, NVLINK, IB)
    expected = 2 * (7 / 8 * s / 300e9 + 7 * 5e-6) + (2 * 3 / 4 * (s / 8) / 25e9 + 2 * 3 * 10e-6)
    assert got == pytest.approx(expected)
    # Across nodes it beats a flat ring over the slow link.
    assert got < cm.ring_allreduce_time_s(s, local * nodes, IB)


def test_parameter_server() -> None:
    s = 1e9
    # One server per worker: each side moves S per direction.
    assert cm.ps_allreduce_time_s(s, 8, 8, IB) == pytest.approx(2 * (10e-6 + s / 25e9))
    # One server for 8 workers: its link carries 8·S.
    assert cm.ps_allreduce_time_s(s, 8, 1, IB) == pytest.approx(2 * (10e-6 + 8 * s / 25e9))
    with pytest.raises(ValueError, match="server"):
        cm.ps_allreduce_time_s(s, 8, 0, IB)


@settings(max_examples=80, deadline=None)
@given(s=st.floats(0, 1e11), n=st.integers(1, 2048), bw=st.floats(1e8, 1e12), alpha=st.floats(0, 1e-4),
       algo=st.sampled_from(["ring", "tree", "native"]))
def test_collectives_monotone(s: float, n: int, bw: float, alpha: float, algo: str) -> None:
    link = cm.LinkCost(bw, alpha, "inter")
    t = cm.allreduce_time_s(s, n, link, algo)  # type: ignore[arg-type]
    assert t >= 0
    assert cm.allreduce_time_s(s * 2 + 1, n, link, algo) >= t  # type: ignore[arg-type]
    assert cm.allreduce_time_s(s, n + 1, link, algo) >= t  # type: ignore[arg-type]
    assert cm.allreduce_time_s(s, n, cm.LinkCost(bw * 2, alpha, "inter"), algo) <= t  # type: ignore[arg-type]
    for f in (cm.reduce_scatter_time_s, cm.all_gather_time_s):
        assert f(s * 2 + 1, n, link) >= f(s, n, link)
        assert f(s, n + 1, link) >= f(s, n, link)
    assert cm.ps_allreduce_time_s(s, n + 1, 1, link) >= cm.ps_allreduce_time_s(s, n, 1, link)


# ------------------------------------------------------------------------------------ link choice


def test_group_link_levels() -> None:
    assert cm.group_link(DGX4, 8, 1).level == "intra"  # TP=8 inside a DGX
    assert cm.group_link(DGX4, 2, 4).level == "intra"  # ranks {r, r+4}: period 8 fits
    assert cm.group_link(DGX4, 3, 1).level == "inter"  # groups of 3 straddle node boundaries
    dp = cm.group_link(DGX4, 4, 8)  # DP across the 4 nodes, one member per node
    assert dp.level == "inter"
    assert dp.bandwidth == DGX4.inter_node.bandwidth == 25e9
    assert dp.latency == DGX4.inter_node.latency
    assert cm.group_link(load_preset("a100-80g"), 3, 1).level == "intra"  # one node: everything is intra


def test_fewer_senders_share_the_node_network() -> None:
    one = cm.group_link(DGX4, 4, 8, senders_per_node=1)
    assert one.bandwidth == 8 * 25e9
    assert cm.group_link(DGX4, 4, 8, senders_per_node=4).bandwidth == 2 * 25e9
    with pytest.raises(ValueError, match="senders_per_node"):
        cm.group_link(DGX4, 4, 8, senders_per_node=9)


def test_dp_allreduce_dispatch() -> None:
    s = 2e9
    flat = cm.dp_allreduce_time_s(DGX4, s, 32, 1, "ring")
    assert flat == pytest.approx(cm.ring_allreduce_time_s(s, 32, cm.group_link(DGX4, 32, 1)))
    hier = cm.dp_allreduce_time_s(DGX4, s, 32, 1, "hierarchical")
    assert hier == pytest.approx(cm.hierarchical_allreduce_time_s(s, 8, 4, DGX4.intra_node, DGX4.inter_node))
    # One member per node: hierarchical degenerates to a ring.
    assert cm.dp_allreduce_time_s(DGX4, s, 4, 8, "hierarchical") == pytest.approx(cm.dp_allreduce_time_s(DGX4, s, 4, 8, "ring"))
    # Inside a node, stride 2 (TP=2): 4 members, a ring over NVLink.
    assert cm.dp_allreduce_time_s(DGX4, s, 4, 2, "hierarchical") == pytest.approx(cm.ring_allreduce_time_s(s, 4, DGX4.intra_node))
    assert cm.dp_allreduce_time_s(DGX4, s, 8, 4, "ps") == pytest.approx(cm.ps_allreduce_time_s(s, 8, 8, cm.group_link(DGX4, 8, 4)))
    with pytest.raises(ValueError, match="unknown all-reduce"):
        cm.dp_allreduce_time_s(DGX4, s, 8, 4, "butterfly")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- overlap


def bucket_simulation(allreduce_s: float, backward_s: float, k: int) -> float:
    """Buckets ready at i/k·T_b, reduced one at a time, A/k each: exposed time after the backward."""
    free = 0.0
    for i in range(1, k + 1):
        free = max(free, i * backward_s / k) + allreduce_s / k
    return max(0.0, free - backward_s)


@settings(max_examples=80, deadline=None)
@given(a=st.floats(0, 10), tb=st.floats(0, 10), grad=st.floats(1, 1e9), bucket=st.floats(1e6, 1e9))
def test_overlap_equals_a_bucket_by_bucket_simulation(a: float, tb: float, grad: float, bucket: float) -> None:
    k = math.ceil(grad / bucket)
    got = cm.dp_overlap_exposed_time(a, tb, bucket, grad)
    assert got == pytest.approx(bucket_simulation(a, tb, k), rel=1e-9, abs=1e-12)
    assert a / k - 1e-12 <= got <= a + 1e-12


def test_overlap_edges() -> None:
    assert cm.dp_overlap_exposed_time(2.0, 100.0, 25e6, 25e6) == 2.0  # one bucket: nothing overlaps
    assert cm.dp_overlap_exposed_time(2.0, 100.0, 25e6, 100e6) == 0.5  # 4 buckets, long backward
    assert cm.dp_overlap_exposed_time(2.0, 0.0, 25e6, 100e6) == 2.0  # no backward to hide under
    with pytest.raises(ValueError, match="bucket"):
        cm.dp_overlap_exposed_time(1.0, 1.0, 0.0, 1.0)


# -------------------------------------------------------------------------------- TP and pipeline


def gpt3() -> TransformerFacts:
    return TransformerFacts("decoder", 96, 12288, 96, 96, 4 * 12288, 51200, 2048, True)


def test_tp_comm_per_layer() -> None:
    f, b, t = gpt3(), 1, 8
    nbytes = b * 2048 * 12288 * 2
    fwd, bwd = cm.tp_comm_time_per_layer(f, b, t, NVLINK, False, 2)
    assert fwd == bwd == pytest.approx(2 * cm.ring_allreduce_time_s(nbytes, t, NVLINK))
    sp = cm.tp_comm_time_per_layer(f, b, t, NVLINK, True, 2)
    assert sp[0] == pytest.approx(fwd)  # same volume (Korthikanti et al. Sec. 4.2.2)
    assert cm.tp_comm_time_per_layer(f, b, 1, NVLINK, True, 2) == (0.0, 0.0)
    assert cm.tp_comm_time_per_layer(f, 2, t, NVLINK, False, 2)[0] > fwd


def test_pipeline_p2p_scatter_gather() -> None:
    nbytes = 2048 * 12288 * 2.0
    plain = cm.pipeline_p2p_time(nbytes, IB, 8, scatter_gather=False)
    assert plain == pytest.approx(10e-6 + nbytes / 25e9)
    sg = cm.pipeline_p2p_time(nbytes, IB, 8, scatter_gather=True, gather_link=NVLINK)
    assert sg == pytest.approx(10e-6 + nbytes / 8 / 25e9 + cm.all_gather_time_s(nbytes, 8, NVLINK))
    assert sg < plain
    assert cm.pipeline_p2p_time(nbytes, IB, 1, scatter_gather=True) == plain
    with pytest.raises(ValueError, match="all-gather"):
        cm.pipeline_p2p_time(nbytes, IB, 8, scatter_gather=True)


# ------------------------------------------------------------------------------------ compression


def test_wire_bytes() -> None:
    n = 1_000_000
    assert cm.wire_bytes(n, "none") == 4e6
    assert cm.wire_bytes(n, "fp16") == cm.wire_bytes(n, "bf16") == 2e6
    assert cm.wire_bytes(n, "bf16", dtype_bytes=2) == 2e6  # 16-bit gradients are not halved again
    assert cm.wire_bytes(n, "topk", topk_ratio=0.01) == 10_000 * (4 + 4)
    shapes = [(1000, 500), (200, 100)]  # 520,000 elements in matrices, 480,000 elsewhere
    expected = ((1000 + 500) * 4 + (200 + 100) * 4 + 480_000) * 4
    assert cm.wire_bytes(n, "powersgd", matrix_shapes=shapes, powersgd_rank=4) == expected
    # A rank too large to save anything sends the matrix as is.
    assert cm.wire_bytes(6, "powersgd", matrix_shapes=[(2, 3)], powersgd_rank=4) == 6 * 4


def test_wire_bytes_errors() -> None:
    with pytest.raises(ValueError, match="ratio"):
        cm.wire_bytes(10, "topk")
    with pytest.raises(ValueError, match="rank"):
        cm.wire_bytes(10, "powersgd", matrix_shapes=[(2, 5)])
    with pytest.raises(ValueError, match="more than numel"):
        cm.wire_bytes(5, "powersgd", matrix_shapes=[(2, 5)], powersgd_rank=1)
    with pytest.raises(ValueError, match="compression"):
        cm.wire_bytes(5, "zip")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 10**8), ratio=st.floats(1e-4, 1.0), rank=st.integers(1, 64))
def test_compression_never_sends_more_than_fp32_plus_indices(n: int, ratio: float, rank: int) -> None:
    raw = cm.wire_bytes(n, "none")
    assert cm.wire_bytes(n, "fp16") == raw / 2
    assert cm.wire_bytes(n, "topk", topk_ratio=ratio) <= 2 * raw
    side = int(math.isqrt(n))
    assert cm.wire_bytes(n, "powersgd", matrix_shapes=[(side, side)], powersgd_rank=rank) <= raw
