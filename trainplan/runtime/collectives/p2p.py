"""Point-to-point plumbing shared by the hand-written collectives: one call's context (group, rank,
timeout, byte counter), sends and receives that count what they put on the wire, waits that never
hang, and the chunk layouts every rank computes identically.

Every wait passes an explicit timeout to ``Work.wait``: gloo then raises
``Timed out waiting ... for recv operation`` instead of blocking, and we re-raise it as a
:class:`CollectiveError` naming the algorithm, the rank, the peer and the step.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from trainplan.errors import TrainplanError

DEFAULT_TIMEOUT = timedelta(seconds=600)  # the plan's default ``collective_timeout_s``


class CollectiveError(TrainplanError):
    """A collective failed or timed out; the message names the algorithm, rank, peer and step."""


@dataclass
class WireCounter:
    """Bytes one rank puts on the wire.

    ``sent_bytes`` and ``messages`` are counted at every ``isend`` our own algorithms post (measured).
    ``modeled_bytes`` is for collectives whose inside we cannot see (gloo's or NCCL's own
    all-reduce / all-gather): the bytes their ring algorithm sends, from the payload handed to them
    (see :mod:`trainplan.runtime.collectives.wire`). Thread-safe: hooks count from a worker thread.
    """

    sent_bytes: int = 0
    messages: int = 0
    modeled_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_sent(self, nbytes: int) -> None:
        with self._lock:
            self.sent_bytes += nbytes
            self.messages += 1

    def add_modeled(self, nbytes: int) -> None:
        with self._lock:
            self.modeled_bytes += nbytes

    @property
    def total_bytes(self) -> int:
        return self.sent_bytes + self.modeled_bytes

    def reset(self) -> None:
        with self._lock:
            self.sent_bytes = self.messages = self.modeled_bytes = 0


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


@dataclass(frozen=True)
class Comm:
    """The context of one collective call: ranks are ranks *in* ``group`` (``None`` = the world)."""

    algo: str
    group: dist.ProcessGroup | None
    rank: int
    size: int
    timeout: timedelta
    counter: WireCounter | None

    @classmethod
    def of(cls, algo: str, group: dist.ProcessGroup | None, timeout: timedelta | None,
           counter: WireCounter | None) -> "Comm":
        if not dist.is_initialized():
            raise CollectiveError(f"allreduce_{algo}: torch.distributed is not initialised; "
                                  "call init_process_group(..., timeout=...) first")
        return cls(algo, group, group_rank(group), group_size(group), timeout or DEFAULT_TIMEOUT, counter)

    def isend(self, tensor: torch.Tensor, peer: int, tag: int) -> dist.Work:
        """Post a send of ``tensor`` to group rank ``peer`` and count its bytes."""
        work = dist.isend(tensor, group=self.group, group_dst=peer, tag=tag)
        if self.counter is not None:
            self.counter.add_sent(tensor.numel() * tensor.element_size())
        return work

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int) -> dist.Work:
        return dist.irecv(tensor, group=self.group, group_src=peer, tag=tag)

    def wait(self, work: dist.Work, what: str) -> None:
        """Wait for ``work`` at most ``self.timeout``; ``what`` says which op, for the error."""
        try:
            work.wait(timeout=self.timeout)
        except RuntimeError as exc:
            raise CollectiveError(
                f"allreduce_{self.algo}: rank {self.rank} of {self.size}: {what} failed after at most "
                f"{self.timeout.total_seconds():g} s: {str(exc).strip().splitlines()[-1]}. A peer died, "
                "is stuck, or the ranks called different collectives; check the other ranks' errors."
            ) from exc

    def wait_all(self, works: list[tuple[dist.Work, str]]) -> None:
        for work, what in works:
            self.wait(work, what)


def split_sizes(numel: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous chunks of ``numel`` elements, the first ``numel % parts`` one
    longer (the layout of ``torch.tensor_split``); any ``numel``, also below ``parts``."""
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts")
    base, extra = divmod(numel, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_views(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Views of consecutive slices of the 1-D ``flat`` with the given sizes."""
    out, offset = [], 0
    for size in sizes:
        out.append(flat.narrow(0, offset, size))
        offset += size
    return out


def pieces_for(numel: int, element_size: int, max_pieces: int, min_piece_bytes: int) -> int:
    """How many sub-chunks one message of ``numel`` elements is cut into: as many as fit
    ``min_piece_bytes`` each, at most ``max_pieces``, at least 1. Sender and receiver compute it
    from the same chunk size, so they agree without talking."""
    if numel == 0:
        return 1
    return max(1, min(max_pieces, numel, math.ceil(numel * element_size / min_piece_bytes)))


_WORKSPACE = threading.local()


def workspace(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A 1-D buffer of ``numel`` elements of ``like``'s dtype and device, reused by later calls on
    this thread (each thread keeps the largest it needed, per dtype and device).

    Receive buffers are the one allocation of the algorithms, and a fresh one costs its page faults:
    the kernel zeroes each 4 KiB page on first touch. Measured here, a fresh 32 MiB buffer took
    14-30 ms to fill against 5-9 ms for a reused one, next to a 45-55 ms 64 MiB all-reduce on 2 ranks.
    A thread runs one collective at a time and each algorithm takes the workspace once, so reuse
    is safe. After a :class:`CollectiveError` the group is broken (a late message may still land in
    the buffer): stop using it, as after any failed collective."""
    cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = _WORKSPACE.__dict__.setdefault("buffers", {})
    key = (like.dtype, like.device)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = like.new_empty(numel)
    return buf.narrow(0, 0, numel)


def flat_view(tensor: torch.Tensor, algo: str) -> torch.Tensor:
    """``tensor`` as a 1-D view sharing its memory; collectives work in place on it."""
    if not tensor.is_contiguous():
        raise CollectiveError(f"allreduce_{algo}: the tensor must be contiguous (got strides {tensor.stride()}); "
                              "call .contiguous() and copy the result back")
    return tensor.view(-1)
