"""DDP communication hooks that average gradient buckets with a chosen all-reduce algorithm.

``DistributedDataParallel.register_comm_hook(state, hook)`` calls ``hook(state, bucket)`` as soon as
a bucket's gradients are ready, in bucket order on every rank, and waits for the returned
``torch.futures.Future`` only at the end of the backward pass. Our point-to-point algorithms block
the thread that runs them, so the hook hands the bucket to one background thread per hook (one, so
buckets go on the wire in the same order on every rank) and returns at once: the communication of
bucket ``i`` overlaps the backward computation of the buckets after it (the overlap of Li et al.,
"PyTorch Distributed: experiences on accelerating data parallel training", VLDB 2020, §3.2.3).
"""

# No `from __future__ import annotations` here: DDP's register_comm_hook compares the hook's
# annotations with dist.GradBucket and Future[Tensor] as objects, and refuses strings.

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist

from trainplan.runtime.collectives.hierarchical import build_hierarchy, default_local_size
from trainplan.runtime.collectives.p2p import DEFAULT_TIMEOUT, WireCounter, group_rank, group_size
from trainplan.runtime.collectives.registry import algorithm

HookFn = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


class HookState(Protocol):
    """What every state of a hook of ours offers: bytes sent, buckets handled, and a way to stop."""

    counter: WireCounter
    calls: int

    def close(self) -> None: ...


class AsyncHookState:
    """What every hook of ours carries: the group, the timeout, a byte counter, and the one worker
    thread that runs its communication in bucket order."""

    def __init__(self, name: str, group: dist.ProcessGroup | None, timeout: timedelta | None,
                 counter: WireCounter | None) -> None:
        self.name = name
        self.group = group
        self.size, self.rank = group_size(group), group_rank(group)
        self.timeout = timeout or DEFAULT_TIMEOUT
        self.counter = counter if counter is not None else WireCounter()
        self.calls = 0  # buckets handled, over all steps
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"trainplan-{name}-hook")

    def submit(self, job: Callable[[], torch.Tensor]) -> torch.futures.Future[torch.Tensor]:
        """Run ``job`` on the worker thread; its result or exception completes the returned future."""
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()

        def run() -> None:
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - DDP re-raises it in backward()
                future.set_exception(exc)

        self.calls += 1
        self._pool.submit(run)
        return future

    def close(self) -> None:
        """Stop the worker thread (after the work already handed to it)."""
        self._pool.shutdown(wait=True)


class AllReduceHookState(AsyncHookState):
    """State of an all-reduce hook: the algorithm and its options."""

    def __init__(self, algo: str, group: dist.ProcessGroup | None, *, timeout: timedelta | None,
                 counter: WireCounter | None, options: dict[str, Any]) -> None:
        super().__init__(algo, group, timeout, counter)
        self.algo, self.options, self._fn = algo, options, algorithm(algo)

    def allreduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the group in place (call on the worker thread)."""
        self._fn(tensor, self.group, timeout=self.timeout, counter=self.counter, **self.options)


class CommHook(NamedTuple):
    """A hook and its state: ``model.register_comm_hook(*comm_hook)`` or ``comm_hook.register(model)``."""

    state: HookState
    hook: HookFn

    def register(self, model: torch.nn.parallel.DistributedDataParallel) -> None:
        model.register_comm_hook(self.state, self.hook)

    def close(self) -> None:
        """Release the hook's worker thread once training is over."""
        self.state.close()


def allreduce_hook(state: AllReduceHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` over the group: divide by the group size first (as torch's
    ``allreduce_hook``, so low-precision sums cannot overflow), then all-reduce."""
    buffer = bucket.buffer()

    def job() -> torch.Tensor:
        buffer.div_(state.size)
        state.allreduce(buffer)
        return buffer

    return state.submit(job)


def algorithm_options(algo: str, group: dist.ProcessGroup | None, local_size: int | None, inter: str,
                      timeout: timedelta | None) -> dict[str, Any]:
    """Per-algorithm keyword options; for ``hierarchical`` the subgroups are built here, now, on the
    calling thread (creating groups is collective, so it must not wait for the first bucket)."""
    if algo != "hierarchical":
        return {}
    local_size = local_size or default_local_size()
    build_hierarchy(group, local_size, timeout=timeout)
    return {"local_size": local_size, "inter": inter}


def hook_for(algo: str, group: dist.ProcessGroup | None = None, *, local_size: int | None = None,
             inter: str = "ring", timeout: timedelta | None = None, counter: WireCounter | None = None) -> CommHook:
    """A DDP communication hook averaging gradients with ``algo`` (a key of ``ALLREDUCE``).

    ``local_size`` (ranks per node) and ``inter`` (the cross-node algorithm) apply to
    ``hierarchical``. Call it on every rank of ``group`` at the same point (hierarchical creates
    subgroups). ``state.counter`` counts the bytes the hook sends."""
    algorithm(algo)
    options = algorithm_options(algo, group, local_size, inter, timeout)
    state = AllReduceHookState(algo, group, timeout=timeout, counter=counter, options=options)
    return CommHook(state, allreduce_hook)
