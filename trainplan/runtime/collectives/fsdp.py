"""Our ring reduce-scatter as FSDP2's gradient reduction (``FSDPModule.set_custom_reduce_scatter``).

FSDP2 (ZeRO 2/3) does not all-reduce gradients: it reduce-scatters them, each rank keeping the sum
of its own shard. That is the first half of the ring all-reduce (Patarasuk & Yuan 2009): ``n - 1``
steps, each rank sending ``(n-1)/n·N`` elements. FSDP pads its flat input so that it splits into
``n`` equal chunks; rank ``r`` receives the total of chunk ``r``. Only ``SUM`` and ``AVG`` are
accepted (FSDP asks for ``AVG`` in fp32/bf16 and divides itself around a ``SUM`` in fp16).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
# torch 2.13 exports no public name for the interface set_custom_reduce_scatter takes.
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from trainplan.runtime.collectives.p2p import Comm, CollectiveError, WireCounter, split_views
from trainplan.runtime.collectives.ring import ring_reduce_scatter


class RingReduceScatter(ReduceScatter):
    """A :class:`ReduceScatter` running our pipelined ring over point-to-point messages."""

    def __init__(self, timeout: timedelta | None = None, counter: WireCounter | None = None) -> None:
        self.timeout, self.counter = timeout, counter

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: object, async_op: bool = False) -> dist.Work | None:
        comm = Comm.of("ring", group, self.timeout, self.counter)
        if input_tensor.numel() != comm.size * output_tensor.numel():
            raise CollectiveError(f"ring reduce-scatter: input of {input_tensor.numel()} elements is not {comm.size} "
                                  f"x the output's {output_tensor.numel()}")
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            raise CollectiveError(f"ring reduce-scatter: only SUM and AVG reductions are supported, got {op}; "
                                  "use allreduce: native")
        chunks = split_views(input_tensor.reshape(-1), [output_tensor.numel()] * comm.size)
        ring_reduce_scatter(chunks, comm)
        output_tensor.copy_(chunks[comm.rank].view_as(output_tensor))
        if op == dist.ReduceOp.AVG:
            output_tensor.div_(comm.size)
        return None
