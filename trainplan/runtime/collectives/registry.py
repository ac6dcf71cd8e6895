"""The registry of all-reduce algorithms by name (the plan's ``allreduce`` field, less ``ps``)."""

from __future__ import annotations

from collections.abc import Callable

from trainplan.runtime.collectives.hierarchical import allreduce_hierarchical
from trainplan.runtime.collectives.native import allreduce_native
from trainplan.runtime.collectives.p2p import CollectiveError
from trainplan.runtime.collectives.ring import allreduce_ring
from trainplan.runtime.collectives.tree import allreduce_tree

AllReduceFn = Callable[..., None]

ALLREDUCE: dict[str, AllReduceFn] = {
    "native": allreduce_native,
    "ring": allreduce_ring,
    "tree": allreduce_tree,
    "hierarchical": allreduce_hierarchical,
}


def algorithm(name: str) -> AllReduceFn:
    """The all-reduce function called ``name``; a clear error for an unknown name."""
    if name not in ALLREDUCE:
        raise CollectiveError(f"unknown all-reduce algorithm {name!r}; expected one of {', '.join(ALLREDUCE)}")
    return ALLREDUCE[name]
