"""Elements each rank sends in one all-reduce, per algorithm: the same layouts the algorithms use,
so a :class:`~trainplan.runtime.collectives.p2p.WireCounter` filled by a real run must equal them.

Multiply by the element size for bytes. ``native`` (gloo's or NCCL's own all-reduce) is modeled as
the ring it runs for large messages (gloo's ``allreduce`` algorithm ``ring``; NCCL's ring): the
per-rank split of its chunks is not visible to us, the total over ranks is ``2(n-1)·N`` either way.
"""

from __future__ import annotations

from trainplan.runtime.collectives.p2p import split_sizes
from trainplan.runtime.collectives.tree import heap_node, tree_segments

INTER_ALGORITHMS = ("ring", "tree", "native")


def ring_elements_sent(numel: int, n: int, rank: int) -> int:
    """Ring all-reduce (Patarasuk & Yuan 2009): every chunk but the rank's own in the reduce-scatter,
    every chunk but the next rank's in the all-gather: ``2N - |c_r| - |c_(r+1)|``."""
    if n < 2:
        return 0
    sizes = split_sizes(numel, n)
    return 2 * numel - sizes[rank] - sizes[(rank + 1) % n]


def ring_reduce_scatter_elements_sent(numel: int, n: int, rank: int) -> int:
    """The reduce-scatter half: every chunk but the rank's own."""
    return numel - split_sizes(numel, n)[rank] if n > 1 else 0


def ring_all_gather_elements_sent(numel: int, n: int, rank: int) -> int:
    """The all-gather half: every chunk but the next rank's."""
    return numel - split_sizes(numel, n)[(rank + 1) % n] if n > 1 else 0


def tree_elements_sent(numel: int, n: int, rank: int) -> int:
    """Double binary tree (Sanders et al. 2009): per tree, the segment once up to the parent and
    once down to each child."""
    if n < 2:
        return 0
    total = 0
    for _, length, mirrored in tree_segments(numel, n):
        node = heap_node(rank, n, mirrored)
        total += length * ((node.parent is not None) + len(node.children))
    return total


def hierarchical_elements_sent(numel: int, n: int, rank: int, local_size: int, inter: str = "ring") -> int:
    """Ring reduce-scatter inside the node, ``inter`` all-reduce of the rank's shard across nodes,
    ring all-gather inside the node."""
    check_local_size(n, local_size)
    node, local = divmod(rank, local_size)
    shard = split_sizes(numel, local_size)[local]
    inside = ring_elements_sent(numel, local_size, local)
    across = allreduce_elements_sent("ring" if inter == "native" else inter, shard, n // local_size, node)
    return inside + across


def allreduce_elements_sent(algo: str, numel: int, n: int, rank: int, local_size: int | None = None,
                            inter: str = "ring") -> int:
    """Elements ``rank`` of ``n`` sends in one all-reduce of ``numel`` elements with ``algo``."""
    if algo in ("ring", "native"):
        return ring_elements_sent(numel, n, rank)
    if algo == "tree":
        return tree_elements_sent(numel, n, rank)
    if algo == "hierarchical":
        if local_size is None:
            raise ValueError("hierarchical all-reduce needs local_size (ranks per node)")
        return hierarchical_elements_sent(numel, n, rank, local_size, inter)
    raise ValueError(f"unknown all-reduce algorithm {algo!r}; expected one of native, ring, tree, hierarchical")


def all_gather_elements_sent(block: int, n: int) -> int:
    """Ring all-gather of one ``block``-element block per rank: ``(n-1)·block`` (also the model for
    the backend's own all-gather)."""
    return (n - 1) * block


def check_local_size(n: int, local_size: int) -> None:
    """``local_size`` ranks per node must divide the group of ``n`` ranks."""
    if local_size < 1 or n % local_size:
        raise ValueError(f"local_size (ranks per node) must be a positive divisor of the group size {n}, "
                         f"got {local_size}")
