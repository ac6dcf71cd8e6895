"""Pure parts of the collectives and compression (no process group): chunk layouts, trees, the bytes
each algorithm sends, PowerSGD's compression rule against torch's own, options and error paths."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

from trainplan.runtime.collectives import ALLREDUCE, CollectiveError, allreduce
from trainplan.runtime.collectives.p2p import pieces_for, split_sizes
from trainplan.runtime.collectives.tree import heap_node, tree_segments
from trainplan.runtime.collectives.wire import (
    allreduce_elements_sent,
    hierarchical_elements_sent,
    ring_all_gather_elements_sent,
    ring_elements_sent,
    ring_reduce_scatter_elements_sent,
    tree_elements_sent,
)
from trainplan.runtime.compression import CompressionOptions, powersgd_parts, topk_count, wire_bytes_per_step

numels = st.integers(0, 10**6)
worlds = st.integers(1, 64)


def test_registry_names_the_four_algorithms() -> None:
    assert set(ALLREDUCE) == {"native", "ring", "tree", "hierarchical"}


@given(numel=st.integers(0, 5000), parts=worlds)
def test_split_sizes_is_tensor_split(numel: int, parts: int) -> None:
    sizes = split_sizes(numel, parts)
    assert sizes == [len(c) for c in torch.arange(numel).tensor_split(parts)]
    assert sum(sizes) == numel and max(sizes) - min(sizes) <= 1


@given(numel=numels, size=st.sampled_from([2, 4]), pieces=st.integers(1, 16), min_bytes=st.integers(1, 2**20))
def test_pieces_are_bounded(numel: int, size: int, pieces: int, min_bytes: int) -> None:
    p = pieces_for(numel, size, pieces, min_bytes)
    assert p >= 1
    assert p <= max(1, min(pieces, numel))


@given(numel=numels, n=worlds)
def test_ring_sends_the_bandwidth_optimal_total(numel: int, n: int) -> None:
    per_rank = [ring_elements_sent(numel, n, r) for r in range(n)]
    assert sum(per_rank) == 2 * (n - 1) * numel  # Patarasuk & Yuan 2009: 2(n-1)/n·N per rank, summed
    assert all(abs(b - 2 * (n - 1) * numel / n) <= 2 for b in per_rank)
    assert per_rank == [ring_reduce_scatter_elements_sent(numel, n, r) + ring_all_gather_elements_sent(numel, n, r)
                        for r in range(n)]


@given(n=st.integers(1, 200))
def test_heap_trees_are_trees_and_no_rank_is_inner_in_both(n: int) -> None:
    for mirrored in (False, True):
        nodes = [heap_node(r, n, mirrored) for r in range(n)]
        assert sum(node.parent is None for node in nodes) == 1
        for r, node in enumerate(nodes):
            assert all(nodes[c].parent == r for c in node.children)
            assert node.parent is None or r in nodes[node.parent].children
            assert node.depth <= math.log2(n)
    inner = [{r for r in range(n) if heap_node(r, n, m).children} for m in (False, True)]
    assert not inner[0] & inner[1]


@given(numel=numels, n=st.integers(2, 64))
def test_double_tree_sends_about_twice_the_message(numel: int, n: int) -> None:
    per_rank = [tree_elements_sent(numel, n, r) for r in range(n)]
    half = (numel + 1) // 2
    assert max(per_rank) <= 3 * half + numel // 2  # inner in one tree (3 halves), leaf in the other (1)
    # each segment goes up n-1 edges and down n-1 edges
    assert sum(per_rank) == sum(2 * (n - 1) * length for _, length, _ in tree_segments(numel, n))


@given(numel=numels, nodes=st.integers(1, 8), local=st.integers(1, 8))
def test_hierarchical_bytes(numel: int, nodes: int, local: int) -> None:
    n = nodes * local
    per_rank = [hierarchical_elements_sent(numel, n, r, local) for r in range(n)]
    if local == 1 or nodes == 1:
        assert per_rank == [ring_elements_sent(numel, n, r) for r in range(n)]
    shards = split_sizes(numel, local)
    across = sum(ring_elements_sent(shards[r % local], nodes, r // local) for r in range(n))
    assert sum(per_rank) == nodes * 2 * (local - 1) * numel + across


def test_hierarchical_needs_a_divisor_and_a_local_size() -> None:
    with pytest.raises(ValueError, match="positive divisor of the group size 6, got 4"):
        hierarchical_elements_sent(10, 6, 0, 4)
    with pytest.raises(ValueError, match="needs local_size"):
        allreduce_elements_sent("hierarchical", 10, 4, 0)
    with pytest.raises(ValueError, match="unknown all-reduce algorithm 'ps'"):
        allreduce_elements_sent("ps", 10, 4, 0)


shapes = st.lists(st.lists(st.integers(1, 300), min_size=0, max_size=3), min_size=1, max_size=6)


@settings(max_examples=300)
@given(shape_list=shapes, rank=st.integers(1, 8), rate=st.floats(1.0, 4.0))
def test_powersgd_rule_is_torchs(shape_list: list[list[int]], rank: int, rate: float) -> None:
    plain = ps = qs = 0
    for shape in shape_list:
        matrix = torch.empty(shape).view(shape[0] if shape else 1, -1)
        rows, cols = matrix.shape
        r = min(rows, cols, rank)
        compress, uncompressed, compressed = _should_compress(rows, cols, r, rate)
        plain += 0 if compress else uncompressed
        ps, qs = (ps + rows * r, qs + cols * r) if compress else (ps, qs)
        assert not compress or compressed == (rows + cols) * r
    assert powersgd_parts(shape_list, rank, rate) == (plain, ps, qs)


@given(numel=st.integers(0, 10**6), ratio=st.floats(1e-6, 1.0))
def test_topk_count(numel: int, ratio: float) -> None:
    k = topk_count(numel, ratio)
    assert (k == 0) == (numel == 0)
    assert k <= numel and (numel == 0 or k >= ratio * numel)


def test_wire_bytes_per_step_by_scheme() -> None:
    buckets = [[(64, 32), (64,)], [(10, 3)]]
    numels = [64 * 32 + 64, 30]
    n = 4
    none = wire_bytes_per_step(buckets, n, algorithm="ring")
    assert sum(none) == sum(2 * (n - 1) * m * 4 for m in numels)
    assert wire_bytes_per_step(buckets, n, compression="fp16", algorithm="ring") == [b // 2 for b in none]
    assert wire_bytes_per_step(buckets, n, compression="bf16", algorithm="ring") == [b // 2 for b in none]
    assert wire_bytes_per_step(buckets, n, grad_dtype=torch.bfloat16, algorithm="ring") == [b // 2 for b in none]
    k = [math.ceil(0.01 * m) for m in numels]
    assert wire_bytes_per_step(buckets, n, compression="topk") == [sum((n - 1) * 8 * x for x in k)] * n
    psgd = wire_bytes_per_step(buckets, n, compression="powersgd", options=CompressionOptions(powersgd_rank=2))
    p, q, plain = 64 * 2, 32 * 2, 64 + 30  # (10, 3) is not worth compressing at rate 2
    assert sum(psgd) == 2 * (n - 1) * (p + q + plain) * 4
    assert sum(wire_bytes_per_step(buckets, n, algorithm="tree")) == sum(2 * (n - 1) * m * 4 for m in numels)


@pytest.mark.parametrize("field, value, message", [
    ("topk_ratio", 0.0, "topk_ratio must be in"),
    ("topk_ratio", 1.5, "topk_ratio must be in"),
    ("powersgd_rank", 0, "powersgd_rank must be a positive integer"),
    ("powersgd_start_iter", 1, "powersgd_start_iter must be at least 2"),
])
def test_compression_options_are_checked(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CompressionOptions(**{field: value})


def test_wire_bytes_rejects_an_unknown_compression() -> None:
    with pytest.raises(ValueError, match="unknown compression 'zip'"):
        wire_bytes_per_step([[(3,)]], 2, compression="zip")


def test_collectives_without_a_process_group_are_a_clear_error() -> None:
    with pytest.raises(CollectiveError, match="torch.distributed is not initialised"):
        allreduce(torch.ones(3), "ring")
