"""Hierarchical all-reduce: reduce-scatter inside each node, all-reduce across nodes among the ranks
with the same local rank, all-gather inside the node (the two-level scheme of Horovod's
hierarchical all-reduce and of Jia et al., "Highly scalable deep learning training system with
mixed-precision: training ImageNet in four minutes", arXiv:1807.11205, 2018).

With ``L`` ranks per node and ``m = n / L`` nodes, each rank sends ``2(L-1)/L·N`` over the fast intra-node
links and only ``2(m-1)/m·N/L`` over the network, ``L`` times less than a flat ring crossing nodes.
Ranks ``[k·L, (k+1)·L)`` of the group form node ``k`` (torchrun's and Slurm's placement), so a single
host can test it with 4 ranks as 2 "nodes" of 2.

The subgroups are created with ``dist.new_group(..., use_local_synchronization=True)`` (only the
members take part), every rank in the same order — its node group, then its cross-node group — so
creation cannot deadlock. :func:`build_hierarchy` is collective over the group; the result is
cached per (group, local_size) so repeated all-reduces reuse the subgroups.

Precision: a chunk is summed by the intra-node ring (``L-1`` roundings) and then across nodes
(``m-1``), at most ``n-1`` roundings in the tensor's dtype, the ring's bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainplan.runtime.collectives.native import allreduce_native
from trainplan.runtime.collectives.p2p import (
    DEFAULT_TIMEOUT,
    Comm,
    CollectiveError,
    WireCounter,
    flat_view,
    group_rank,
    group_size,
    split_sizes,
    split_views,
)
from trainplan.runtime.collectives.ring import allreduce_ring, ring_all_gather, ring_reduce_scatter
from trainplan.runtime.collectives.tree import allreduce_tree
from trainplan.runtime.collectives.wire import INTER_ALGORITHMS, check_local_size


@dataclass(frozen=True)
class Hierarchy:
    """A rank's two subgroups: ``intra`` (its node; ``None`` when a node has one rank) and ``inter``
    (same local rank on every node; ``None`` when there is one node)."""

    local_size: int
    nodes: int
    node: int
    local_rank: int
    intra: dist.ProcessGroup | None
    inter: dist.ProcessGroup | None


# Built hierarchies by (parent group object, local_size). Groups cannot be created per call (creation
# is collective and slow), and a group object is never reused for another group, so entries of a
# destroyed group are merely unused.
_CACHE: list[tuple[dist.ProcessGroup, int, Hierarchy]] = []


def _parent(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return group if group is not None else dist.group.WORLD


def build_hierarchy(group: dist.ProcessGroup | None, local_size: int, *,
                    timeout: timedelta | None = None) -> Hierarchy:
    """Create (collectively, over ``group``) or reuse the node and cross-node subgroups."""
    parent = _parent(group)
    for cached_group, cached_size, hierarchy in _CACHE:
        if cached_group is parent and cached_size == local_size:
            return hierarchy
    n, rank = group_size(group), group_rank(group)
    try:
        check_local_size(n, local_size)
    except ValueError as exc:
        raise CollectiveError(f"allreduce_hierarchical: {exc}") from None
    ranks = dist.get_process_group_ranks(parent)
    node, local = divmod(rank, local_size)
    nodes = n // local_size
    if local_size > 1 and nodes > 1:  # every rank: its node's group first, then its cross-node group
        kwargs = {"timeout": timeout or DEFAULT_TIMEOUT, "use_local_synchronization": True}
        intra = dist.new_group(ranks[node * local_size:(node + 1) * local_size], **kwargs)
        inter = dist.new_group(ranks[local::local_size], **kwargs)
    else:  # one node (the group itself is the node) or one rank per node (the group crosses nodes)
        intra = parent if nodes == 1 else None
        inter = parent if local_size == 1 else None
    _check_order(intra, local, inter, node)
    hierarchy = Hierarchy(local_size, nodes, node, local, intra, inter)
    _CACHE.append((parent, local_size, hierarchy))
    return hierarchy


def _check_order(intra: dist.ProcessGroup | None, local: int, inter: dist.ProcessGroup | None, node: int) -> None:
    """new_group orders its ranks ascending; the hierarchy needs them in the parent group's order."""
    if (intra is not None and group_rank(intra) != local) or (inter is not None and group_rank(inter) != node):
        raise CollectiveError("allreduce_hierarchical: the group's ranks are not in ascending global order "
                              "(created with sort_ranks=False?); hierarchical all-reduce needs them ascending")


def default_local_size() -> int:
    """Ranks per node from torchrun's ``LOCAL_WORLD_SIZE``; an error when it is not set."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    if value is None:
        raise CollectiveError("allreduce_hierarchical: pass local_size (ranks per node); "
                              "LOCAL_WORLD_SIZE is not set (the process was not started by torchrun)")
    return int(value)


def _inter_allreduce(shard: torch.Tensor, hierarchy: Hierarchy, inter: str, timeout: timedelta | None,
                     counter: WireCounter | None) -> None:
    kwargs = {"timeout": timeout, "counter": counter}
    if inter == "ring":
        allreduce_ring(shard, hierarchy.inter, **kwargs)
    elif inter == "tree":
        allreduce_tree(shard, hierarchy.inter, **kwargs)
    else:
        allreduce_native(shard, hierarchy.inter, **kwargs)


def allreduce_hierarchical(tensor: torch.Tensor, group: dist.ProcessGroup | None = None, *,
                           local_size: int | None = None, inter: str = "ring",
                           timeout: timedelta | None = None, counter: WireCounter | None = None) -> None:
    """Sum ``tensor`` over ``group`` in place: intra-node ring reduce-scatter, ``inter``
    (``ring``, ``tree`` or ``native``) all-reduce of this rank's shard across nodes, intra-node ring
    all-gather. ``local_size`` is the number of ranks per node (default: torchrun's
    ``LOCAL_WORLD_SIZE``); it must divide the group size."""
    if inter not in INTER_ALGORITHMS:
        raise CollectiveError(f"allreduce_hierarchical: inter must be one of {', '.join(INTER_ALGORITHMS)}, "
                              f"got {inter!r}")
    Comm.of("hierarchical", group, timeout, counter)  # checks that a group exists
    hierarchy = build_hierarchy(group, local_size or default_local_size(), timeout=timeout)
    flat = flat_view(tensor, "hierarchical")
    chunks = split_views(flat, split_sizes(flat.numel(), hierarchy.local_size))
    intra = Comm.of("hierarchical", hierarchy.intra, timeout, counter) if hierarchy.local_size > 1 else None
    if intra is not None:
        ring_reduce_scatter(chunks, intra)
    if hierarchy.nodes > 1:
        _inter_allreduce(chunks[hierarchy.local_rank], hierarchy, inter, timeout, counter)
    if intra is not None:
        ring_all_gather(chunks, intra)
