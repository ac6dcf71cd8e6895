"""Ring all-reduce over point-to-point messages: a reduce-scatter then an all-gather, ``n - 1`` steps
each (Patarasuk & Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations",
J. Parallel Distrib. Comput. 69(2), 2009; the algorithm of Baidu's ring all-reduce and of NCCL's
and gloo's ring).

The tensor is cut into ``n`` chunks (sizes differ by at most one element, so any length works).
With ``c`` = ``(r - s - 1) mod n``, rank ``r`` at step ``s`` sends chunk ``c`` to ``r + 1`` and receives
chunk ``c - 1`` from ``r - 1``: in steps ``0 .. n-2`` it adds what it receives (reduce-scatter, after
which rank ``r`` holds the sum of chunk ``r``), in steps ``n-1 .. 2n-3`` it stores it (all-gather).
Each rank sends ``2N - |chunk r| - |chunk r+1|`` elements, ``2(n-1)/n·N`` in total per rank on
average, the bandwidth lower bound the paper proves for all-reduce.

Pipelining: every chunk is cut into up to ``max_pieces`` (8) sub-chunks of at least
``min_piece_bytes`` (1 MiB). A step posts all its pieces at once and the receives of the next step
before waiting, and forwards each piece as soon as it arrived and was added, so the next step's
sends overlap this step's receives and additions. On gloo each message costs a context switch or
two; on a 2-core machine pieces below ~1 MiB made a 1 MiB all-reduce 2-5x slower, while 8 pieces
of 2-4 MiB helped at 64 MiB (docs/collectives.md).

Memory: the reduce-scatter receives into two chunk-sized buffers from the thread's workspace
(:func:`~trainplan.runtime.collectives.p2p.workspace`); the all-gather receives in place.

Precision: partial sums travel in the tensor's dtype (the point of bf16 is half the bytes). Each
addition is one rounding to that dtype (torch adds bf16 in fp32 and rounds once), so a chunk
collects ``n - 1`` roundings: ``|result - exact| <= (n-1)·u·Σ|x_i|`` to first order, ``u = 2**-8`` for
bf16 and ``2**-24`` for fp32 (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
§4.2, recursive summation). gloo's and NCCL's own rings round the same way. The all-gather copies,
so every rank ends with bit-identical values.
"""

from __future__ import annotations

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

MAX_PIECES = 8  # TORCH-NOTES: a Python ring on gloo ran fastest with ~8 sub-chunks per step
MIN_PIECE_BYTES = 1024 * 1024  # smaller pieces cost more in per-message latency than they overlap


Recv = tuple[dist.Work | None, torch.Tensor, torch.Tensor]  # (work, the chunk's piece, where it lands)


class _Ring:
    """One ring pass over ``chunks`` (views of one flat tensor, one per rank, in rank order)."""

    def __init__(self, chunks: list[torch.Tensor], comm: Comm, max_pieces: int, min_piece_bytes: int) -> None:
        self.comm, self.chunks, self.max_pieces = comm, chunks, max_pieces
        self.n, self.r = comm.size, comm.rank
        self.right, self.left = (self.r + 1) % self.n, (self.r - 1) % self.n
        size = chunks[0].element_size() if chunks else 1
        self.layout = [split_sizes(c.numel(), pieces_for(c.numel(), size, max_pieces, min_piece_bytes))
                       for c in chunks]
        self.biggest = max((c.numel() for c in chunks), default=0)
        self._scratch: list[torch.Tensor] = []
        # Sends not yet waited, by the (chunk, piece) they read. A Work is waited exactly once: gloo
        # counts completions, and a second wait on a send times out.
        self.pending: dict[tuple[int, int], list[tuple[dist.Work, str]]] = {}

    def send_chunk(self, step: int) -> int:
        return (self.r - step - 1) % self.n

    def recv_chunk(self, step: int) -> int:
        return (self.r - step - 2) % self.n

    def scratch(self, step: int) -> torch.Tensor:
        """Where step ``step`` receives what it adds: two buffers, alternating, from this thread's
        workspace (only reducing passes need them)."""
        if not self._scratch:
            both = workspace(2 * self.biggest, self.chunks[0])
            self._scratch = [both.narrow(0, 0, self.biggest), both.narrow(0, self.biggest, self.biggest)]
        return self._scratch[step % 2]

    def pieces(self, chunk: int) -> range:
        return range(len(self.layout[chunk]))

    def _tag(self, step: int, piece: int) -> int:
        return (step % 2) * self.max_pieces + piece  # never two live receives with one tag from one peer

    def post_send(self, step: int, piece: int) -> None:
        c = self.send_chunk(step)
        view = split_views(self.chunks[c], self.layout[c])[piece]
        if view.numel():
            work = self.comm.isend(view, self.right, self._tag(step, piece))
            self.pending.setdefault((c, piece), []).append(
                (work, f"step {step} send of chunk {c} piece {piece} to rank {self.right}"))

    def blocked(self, step: int, piece: int, reduce: bool) -> bool:
        """A gathering receive lands in the chunk itself, which a send may still read (only when
        n = 2, where a rank gathers into the chunk it sent in step 0)."""
        return not reduce and (self.recv_chunk(step), piece) in self.pending

    def post_recv(self, step: int, piece: int, reduce: bool) -> Recv:
        """Receive piece ``piece`` of ``step``: into scratch when reducing, into the chunk when gathering."""
        c = self.recv_chunk(step)
        target = split_views(self.chunks[c], self.layout[c])[piece]
        if reduce:
            land = split_views(self.scratch(step).narrow(0, 0, self.chunks[c].numel()), self.layout[c])[piece]
        else:
            self.comm.wait_all(self.pending.pop((c, piece), []))
            land = target
        work = self.comm.irecv(land, self.left, self._tag(step, piece)) if land.numel() else None
        return work, target, land

    def run(self, first: int, last: int, reduce_until: int) -> None:
        """Steps ``first .. last - 1``; those below ``reduce_until`` add, the rest copy."""
        if first >= last:
            return
        for piece in self.pieces(self.send_chunk(first)):
            self.post_send(first, piece)
        recvs = {j: self.post_recv(first, j, first < reduce_until) for j in self.pieces(self.recv_chunk(first))}
        for step in range(first, last):
            nxt, reduce_next = step + 1 < last, step + 1 < reduce_until
            ahead = {j: self.post_recv(step + 1, j, reduce_next) for j in self.pieces(self.recv_chunk(step + 1))
                     if nxt and not self.blocked(step + 1, j, reduce_next)}
            for j, (work, target, land) in recvs.items():
                if work is not None:
                    self.comm.wait(work, f"step {step} receive of chunk {self.recv_chunk(step)} piece {j} "
                                         f"from rank {self.left}")
                if step < reduce_until:
                    target.add_(land)
                if nxt:
                    self.post_send(step + 1, j)
                    if j not in ahead and j in self.pieces(self.recv_chunk(step + 1)):
                        ahead[j] = self.post_recv(step + 1, j, reduce_next)
            if nxt:
                ahead.update({j: self.post_recv(step + 1, j, reduce_next)
                              for j in self.pieces(self.recv_chunk(step + 1)) if j not in ahead})
            recvs = dict(sorted(ahead.items()))
        for key in list(self.pending):
            self.comm.wait_all(self.pending.pop(key))


def _chunks(flat: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return split_views(flat, split_sizes(flat.numel(), parts))


def ring_reduce_scatter(chunks: list[torch.Tensor], comm: Comm, *, max_pieces: int = MAX_PIECES,
                        min_piece_bytes: int = MIN_PIECE_BYTES) -> None:
    """Sum ``chunks`` (one per rank) over the group so that rank ``r`` holds the total of ``chunks[r]``
    (the other chunks hold partial sums afterwards)."""
    _Ring(chunks, comm, max_pieces, min_piece_bytes).run(0, comm.size - 1, comm.size - 1)


def ring_all_gather(chunks: list[torch.Tensor], comm: Comm, *, max_pieces: int = MAX_PIECES,
                    min_piece_bytes: int = MIN_PIECE_BYTES) -> None:
    """Copy each rank's ``chunks[rank]`` into the same chunk on every other rank."""
    n = comm.size
    _Ring(chunks, comm, max_pieces, min_piece_bytes).run(n - 1, 2 * n - 2, n - 1)


def ring_allreduce_chunks(chunks: list[torch.Tensor], comm: Comm, *, max_pieces: int = MAX_PIECES,
                          min_piece_bytes: int = MIN_PIECE_BYTES) -> None:
    """Reduce-scatter then all-gather as one pipelined pass of ``2(n-1)`` steps."""
    n = comm.size
    _Ring(chunks, comm, max_pieces, min_piece_bytes).run(0, 2 * n - 2, n - 1)


def allreduce_ring(tensor: torch.Tensor, group: dist.ProcessGroup | None = None, *,
                   timeout: timedelta | None = None, counter: WireCounter | None = None,
                   max_pieces: int = MAX_PIECES, min_piece_bytes: int = MIN_PIECE_BYTES) -> None:
    """Sum ``tensor`` over ``group`` in place with the pipelined ring (see the module docstring).

    ``timeout`` bounds every wait (default :data:`~trainplan.runtime.collectives.p2p.DEFAULT_TIMEOUT`);
    ``counter`` counts the bytes this rank sends."""
    comm = Comm.of("ring", group, timeout, counter)
    if comm.size == 1:
        return
    flat = flat_view(tensor, "ring")
    ring_allreduce_chunks(_chunks(flat, comm.size), comm, max_pieces=max_pieces, min_piece_bytes=min_piece_bytes)
