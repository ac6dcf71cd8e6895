"""Selectable all-reduce algorithms for data-parallel gradients, and DDP communication hooks for them.

Every algorithm is a function ``allreduce_<algo>(tensor, group=None, *, timeout=None, counter=None)``
that sums ``tensor`` over ``group`` in place, like ``dist.all_reduce``:

========================  =====================================================================
``native``                ``dist.all_reduce`` (gloo's ring; NCCL's own choice, or ``NCCL_ALGO``)
``ring``                  pipelined reduce-scatter + all-gather over isend/irecv (Patarasuk & Yuan 2009)
``tree``                  pipelined double binary tree reduce + broadcast (Sanders et al. 2009)
``hierarchical``          intra-node reduce-scatter, cross-node all-reduce, intra-node all-gather
========================  =====================================================================

Every wait is bounded by ``timeout`` (default 600 s, the plan's ``collective_timeout_s``) and fails
with :class:`CollectiveError`; ``counter`` (a :class:`WireCounter`) counts the bytes a rank sends.
See docs/collectives.md for the measured bandwidths and when to pick which.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trainplan.runtime.collectives.hierarchical import Hierarchy, allreduce_hierarchical, build_hierarchy
from trainplan.runtime.collectives.hooks import CommHook, hook_for
from trainplan.runtime.collectives.native import allreduce_native
from trainplan.runtime.collectives.p2p import DEFAULT_TIMEOUT, CollectiveError, WireCounter
from trainplan.runtime.collectives.registry import ALLREDUCE, algorithm
from trainplan.runtime.collectives.ring import allreduce_ring
from trainplan.runtime.collectives.tree import allreduce_tree
from trainplan.runtime.collectives.wire import allreduce_elements_sent


def allreduce(tensor: torch.Tensor, algo: str, group: dist.ProcessGroup | None = None, *,
              timeout: timedelta | None = None, counter: WireCounter | None = None, **options: Any) -> None:
    """Sum ``tensor`` over ``group`` in place with the algorithm named ``algo`` (a key of
    :data:`ALLREDUCE`); ``options`` go to it (``local_size=`` for ``hierarchical``)."""
    algorithm(algo)(tensor, group, timeout=timeout, counter=counter, **options)


__all__ = [
    "ALLREDUCE",
    "DEFAULT_TIMEOUT",
    "CollectiveError",
    "CommHook",
    "Hierarchy",
    "WireCounter",
    "allreduce",
    "allreduce_elements_sent",
    "allreduce_hierarchical",
    "allreduce_native",
    "allreduce_ring",
    "allreduce_tree",
    "build_hierarchy",
    "hook_for",
]
