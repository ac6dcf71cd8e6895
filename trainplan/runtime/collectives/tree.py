"""Tree all-reduce: reduce up a binary tree to its root, broadcast back down, pipelined in chunks,
over two complementary trees at once (the double binary tree of Sanders, Speck & Träff, "Two-tree
algorithms for full bandwidth broadcast, reduction and scan", Parallel Computing 35(12), 2009;
NCCL's tree algorithm since 2.4).

Tree A is the binary heap on the group ranks (parent of ``r`` is ``(r-1)//2``); tree B is the same
heap on mirrored labels ``n-1-r``, so most ranks that are inner nodes in one tree are leaves in the
other. The first half of the tensor is reduced and broadcast through tree A, the second half
through tree B, so each rank sends about ``2N`` elements in total (a heap's inner node alone would
send ``3N``) while the latency stays ``2·ceil(log2(n+1))`` hops: the low-latency choice for small
messages, where a ring pays ``2(n-1)`` hops.

Pipelining: each half is cut into up to :data:`MAX_CHUNKS` chunks of at least
:data:`MIN_CHUNK_BYTES`; chunk ``i`` moves up while chunk ``i-1`` moves on, and a rank at depth ``d``
forwards the broadcast of chunk ``i - 2d`` after reducing chunk ``i`` (about when it arrives). In
each round a rank first does its reductions, the tree where it is a leaf first (a leaf only sends,
so its half starts moving at once), then its broadcasts. All receives are posted up front. No
deadlock: a reduction waits only for the same chunk's reductions below it in the same tree, which
come first in their rank's round because no rank is an inner node of both trees; a broadcast waits
only for its parent's broadcast of an earlier round.

Precision: a partial sum is rounded to the tensor's dtype at every inner node, at most ``n-1``
roundings on any path, so ``|result - exact| <= (n-1)·u·Σ|x_i|`` as for the ring (the bound is loose:
a path has ``ceil(log2 n)`` adding nodes). The broadcast copies: all ranks end bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from trainplan.runtime.collectives.p2p import (
    Comm,
    WireCounter,
    flat_view,
    pieces_for,
    split_sizes,
    split_views,
    workspace,
)

MAX_CHUNKS = 8
MIN_CHUNK_BYTES = 1024 * 1024  # smaller chunks lost to per-message cost on gloo (docs/collectives.md)


@dataclass(frozen=True, slots=True)
class TreeNode:
    """A rank's place in one binary tree: its parent (``None`` at the root), children and depth."""

    parent: int | None
    children: tuple[int, ...]
    depth: int


def heap_node(rank: int, n: int, mirrored: bool = False) -> TreeNode:
    """``rank``'s node in the binary heap over ``n`` ranks, on labels ``n-1-rank`` if ``mirrored``."""
    if not 0 <= rank < n:
        raise ValueError(f"rank {rank} is not in a group of {n}")

    def rank_of(label: int) -> int:
        return n - 1 - label if mirrored else label

    label = rank_of(rank)  # the mirror map is its own inverse
    parent = rank_of((label - 1) // 2) if label > 0 else None
    children = tuple(rank_of(c) for c in (2 * label + 1, 2 * label + 2) if c < n)
    return TreeNode(parent, children, int(math.log2(label + 1)))


def tree_segments(numel: int, n: int) -> list[tuple[int, int, bool]]:
    """``(offset, length, mirrored)`` of the halves that go through tree A and tree B; one tree
    when there is a single element (or a single rank)."""
    if numel < 2 or n < 2:
        return [(0, numel, False)]
    first = (numel + 1) // 2
    return [(0, first, False), (first, numel - first, True)]


def buffers_needed(node: TreeNode) -> int:
    """Segment-sized receive buffers of a node: one per child, one for the result from the parent."""
    return len(node.children) + (node.parent is not None)


class _TreePass:
    """Reduce and broadcast of one segment through one tree (see the module docstring)."""

    def __init__(self, seg: torch.Tensor, node: TreeNode, comm: Comm, space: torch.Tensor, tag_base: int,
                 max_chunks: int, min_chunk_bytes: int) -> None:
        """``space``: :func:`buffers_needed` elements to receive into (the children's partial sums,
        then the broadcast result)."""
        self.node, self.comm, self.lag = node, comm, 2 * node.depth
        self.sizes = split_sizes(seg.numel(), pieces_for(seg.numel(), seg.element_size(), max_chunks, min_chunk_bytes))
        self.up_tag, self.down_tag = tag_base, tag_base + max_chunks
        self.seg, self.chunks = seg, split_views(seg, self.sizes)
        self.sends: list[tuple[dist.Work, str]] = []
        slots = split_views(space, [seg.numel()] * buffers_needed(node))
        self.from_children = [self._post(slots[k], child, self.up_tag) for k, child in enumerate(node.children)]
        self.result = slots[-1] if node.parent is not None else seg
        self.from_parent = self._post(self.result, node.parent, self.down_tag) if node.parent is not None else []

    @property
    def count(self) -> int:
        return len(self.sizes)

    def _post(self, buf: torch.Tensor, peer: int, tag: int) -> list[tuple[dist.Work, torch.Tensor]]:
        views = split_views(buf, self.sizes)
        return [(self.comm.irecv(v, peer, tag + i), v) for i, v in enumerate(views)]

    def _send(self, view: torch.Tensor, peer: int, tag: int, what: str) -> None:
        self.sends.append((self.comm.isend(view, peer, tag), f"{what} to rank {peer}"))

    def reduce(self, i: int) -> None:
        for child, received in zip(self.node.children, self.from_children):
            work, view = received[i]
            self.comm.wait(work, f"tree reduce: receive of chunk {i} from child rank {child}")
            self.chunks[i].add_(view)
        if self.node.parent is not None:
            self._send(self.chunks[i], self.node.parent, self.up_tag + i, f"tree reduce: send of chunk {i}")

    def broadcast(self, i: int) -> None:
        if self.node.parent is not None:
            work, _ = self.from_parent[i]
            self.comm.wait(work, f"tree broadcast: receive of chunk {i} from parent rank {self.node.parent}")
        view = split_views(self.result, self.sizes)[i]
        for child in self.node.children:
            self._send(view, child, self.down_tag + i, f"tree broadcast: send of chunk {i}")

    def finish(self) -> None:
        self.comm.wait_all(self.sends)
        if self.node.parent is not None:
            self.seg.copy_(self.result)


def allreduce_tree(tensor: torch.Tensor, group: dist.ProcessGroup | None = None, *,
                   timeout: timedelta | None = None, counter: WireCounter | None = None,
                   max_chunks: int = MAX_CHUNKS, min_chunk_bytes: int = MIN_CHUNK_BYTES) -> None:
    """Sum ``tensor`` over ``group`` in place through the pipelined double binary tree.

    ``timeout`` bounds every wait; ``counter`` counts the bytes this rank sends."""
    comm = Comm.of("tree", group, timeout, counter)
    if comm.size == 1:
        return
    flat = flat_view(tensor, "tree")
    segments = [(t, offset, length, heap_node(comm.rank, comm.size, mirrored))
                for t, (offset, length, mirrored) in enumerate(tree_segments(flat.numel(), comm.size)) if length > 0]
    sizes = [length * buffers_needed(node) for _, _, length, node in segments]
    spaces = split_views(workspace(sum(sizes), flat), sizes)
    passes = [_TreePass(flat.narrow(0, offset, length), node, comm, space, tag_base=2 * max_chunks * t,
                        max_chunks=max_chunks, min_chunk_bytes=min_chunk_bytes)
              for (t, offset, length, node), space in zip(segments, spaces)]
    leaf_first = sorted(passes, key=lambda p: len(p.node.children))
    for i in range(max((p.count + p.lag for p in passes), default=0)):
        for p in leaf_first:
            if i < p.count:
                p.reduce(i)
        for p in passes:
            if 0 <= i - p.lag < p.count:
                p.broadcast(i - p.lag)
    for p in passes:
        p.finish()
