"""The backend's own all-reduce (``dist.all_reduce``): gloo on CPU, NCCL on GPUs.

gloo runs a ring (its ``allreduce`` with the default ``ring`` algorithm). NCCL picks an algorithm
(ring, tree, and on capable systems CollNet / NVLS) and a protocol per call from its tuning model
of message size, node count and link bandwidths. On NCCL the plan's ``ring`` and ``tree`` are best
realised by setting ``NCCL_ALGO=Ring`` or ``NCCL_ALGO=Tree`` in the workers' environment before the
process group (the NCCL communicator) is created and then calling ``native``: NCCL's kernels move
the data GPU to GPU without a Python loop, far faster than our point-to-point versions. Use that
when one algorithm fits every NCCL group of the run: ``NCCL_ALGO`` is read per process, at
communicator creation, so it cannot differ between groups or message sizes. Our own ``ring`` /
``tree`` are what run on gloo, where the backend offers no choice, and on NCCL when different
groups need different algorithms; ``hierarchical`` has no NCCL switch (NCCL's tree is already
node-aware between nodes).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from trainplan.runtime.collectives.p2p import Comm, WireCounter
from trainplan.runtime.collectives.wire import all_gather_elements_sent, ring_elements_sent


def allreduce_native(tensor: torch.Tensor, group: dist.ProcessGroup | None = None, *,
                     timeout: timedelta | None = None, counter: WireCounter | None = None) -> None:
    """Sum ``tensor`` over ``group`` in place with ``dist.all_reduce``, waiting at most ``timeout``.

    ``counter`` gets the ring model's bytes as ``modeled_bytes`` (we cannot see inside the backend)."""
    comm = Comm.of("native", group, timeout, counter)
    if comm.size == 1:
        return
    work = dist.all_reduce(tensor, group=group, async_op=True)
    comm.wait(work, f"dist.all_reduce of {tensor.numel()} {tensor.dtype} elements")
    if counter is not None:
        counter.add_modeled(ring_elements_sent(tensor.numel(), comm.size, comm.rank) * tensor.element_size())


def all_gather_native(out: torch.Tensor, block: torch.Tensor, group: dist.ProcessGroup | None = None, *,
                      timeout: timedelta | None = None, counter: WireCounter | None = None) -> None:
    """``out`` (``n`` blocks, rank order) gets every rank's ``block``, by ``dist.all_gather_into_tensor``."""
    comm = Comm.of("native", group, timeout, counter)
    work = dist.all_gather_into_tensor(out, block, group=group, async_op=True)
    comm.wait(work, f"dist.all_gather_into_tensor of {block.numel()} {block.dtype} elements")
    if counter is not None:
        counter.add_modeled(all_gather_elements_sent(block.numel(), comm.size) * block.element_size())
