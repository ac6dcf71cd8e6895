"""A parameter server over ``torch.distributed`` point-to-point (``allreduce: ps``).

The parameters are sharded, whole tensors, over the first ``comm.ps_servers`` data-parallel ranks
(all of them by default), greedily: each tensor to the server holding the fewest elements so far.
Servers are co-located with workers: a server is a thread of its rank's process, holding the
master copy of its shard and the optimizer for it (Li et al., "Scaling distributed machine
learning with the parameter server", OSDI 2014: workers push gradients, pull parameters; servers
own key ranges and apply the updates).

Per step every worker pushes each server its gradient shard and pulls the server's new shard:

* ``sync: sync`` — a server waits for every worker's push of a step, sums them in worker order,
  divides by the number of workers and applies one optimizer step: exactly the single-process
  step on the mean gradient (up to the order of the sum).
* ``sync: async`` — a server applies each push on arrival (``g / n``, so ``n`` pushes move the
  parameters as far as one synchronous step with SGD), and answers a worker's pull at once unless
  that worker is more than ``s = comm.staleness`` pushes ahead of the slowest worker, in which
  case the answer waits until the slowest catches up (the stale synchronous parallel model, Ho et
  al., "More effective distributed ML via a stale synchronous parallel parameter server", NIPS
  2013). ``s = 0`` keeps workers in lockstep; with SGD it equals the synchronous run up to
  rounding, with Adam it does not (``n`` Adam steps are not one).

Observed staleness of a push = updates the server applied between the worker's pull and its push
(the version difference). The worker reports the largest over servers per step.

Messages: a push is a header ``[worker, step, base version]`` (int64) then the flat fp32 gradient
shard; a reply is ``[version, staleness]`` then the flat shard. Pushes travel on one process group
(received by the server thread with an any-source receive), replies on another; a rank's push to
its own server goes through a queue (torch refuses a send to self). Every wait has the plan's
collective timeout.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from trainplan.ir.plan import Plan
from trainplan.runtime.collectives import CollectiveError, WireCounter
from trainplan.runtime.data_parallel import make_optimizer
from trainplan.runtime.mesh import RankMesh

TAG_PUSH_HEADER, TAG_PUSH, TAG_PULL_HEADER, TAG_PULL = 101, 102, 103, 104


def assign_shards(sizes: list[int], servers: int) -> list[int]:
    """The server of each tensor: greedily the one with the fewest elements so far (ties: lowest)."""
    load = [0] * servers
    owner = []
    for size in sizes:
        j = min(range(servers), key=lambda k: (load[k], k))
        owner.append(j)
        load[j] += size
    return owner


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


@dataclass
class Push:
    worker: int  # index among the workers
    step: int
    base: int  # the server version the gradient was computed on
    grad: torch.Tensor


@dataclass
class Reply:
    version: int
    staleness: int
    shard: torch.Tensor


@dataclass
class LocalSlot:
    """Where the server thread leaves its reply to the worker of its own process."""

    done: threading.Event = field(default_factory=threading.Event)
    reply: Reply | None = None


class Shard:
    """A server's state: the master copy of its tensors, their optimizer, the version (updates
    applied), every worker's push count, and the replies still held back."""

    def __init__(self, plan: Plan, tensors: list[torch.Tensor], workers: int, mode: str, staleness: int) -> None:
        self.master = [nn.Parameter(t.detach().clone()) for t in tensors]
        self.optimizer = make_optimizer(self.master, plan.spec.training, 0, None)
        self.workers, self.mode, self.bound = workers, mode, staleness
        self.version = 0
        self.pushes = [0] * workers
        self.pending: dict[int, dict[int, torch.Tensor]] = {}  # sync: step -> worker -> gradient
        self.waiting: dict[int, int] = {}  # worker -> staleness of its last push, reply held back

    def _apply(self, grad: torch.Tensor) -> None:
        offset = 0
        for p in self.master:
            p.grad = grad[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1

    def receive(self, push: Push) -> None:
        """Apply (async) or collect (sync) one push."""
        self.pushes[push.worker] += 1
        if self.mode == "async":
            self.waiting[push.worker] = self.version - push.base
            self._apply(push.grad / self.workers)
            return
        self.waiting[push.worker] = self.version - push.base
        step = self.pending.setdefault(push.step, {})
        step[push.worker] = push.grad
        if len(step) == self.workers:
            total = step[0].clone()
            for w in range(1, self.workers):
                total += step[w]
            del self.pending[push.step]
            self._apply(total / self.workers)

    def ready(self) -> list[int]:
        """Workers whose held-back reply may go now."""
        if self.mode == "async":
            slowest = min(self.pushes)
            return [w for w in self.waiting if self.pushes[w] - slowest <= self.bound]
        return [w for w in self.waiting if self.version >= self.pushes[w]]

    def reply(self, worker: int) -> Reply:
        staleness = self.waiting.pop(worker)
        return Reply(self.version, staleness, flat([p.detach() for p in self.master]).clone())


class ServerThread:
    """Runs a :class:`Shard` on two threads: a receiver (any-source receives of remote pushes; a gloo
    receive cannot be polled, so it blocks with the timeout) feeding a queue that the rank's own
    worker also feeds, and the server, which applies the queue in arrival order and replies."""

    def __init__(self, shard: Shard, me: int, ranks: list[int], groups: tuple[dist.ProcessGroup, dist.ProcessGroup],
                 total_pushes: int, timeout_s: float, counter: WireCounter) -> None:
        self.shard, self.me, self.ranks = shard, me, ranks
        self.push_group, self.pull_group = groups
        self.total, self.timeout_s, self.counter = total_pushes, timeout_s, counter
        self.local: queue.Queue[Push] = queue.Queue()
        self.slot = LocalSlot()
        self.error: BaseException | None = None
        self._sends: list[dist.Work] = []
        self.thread = threading.Thread(target=self._guard, args=(self._serve,), name="trainplan-ps-server", daemon=True)
        self.receiver = threading.Thread(target=self._guard, args=(self._receive,), name="trainplan-ps-recv",
                                         daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.receiver.start()

    def _guard(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:  # noqa: BLE001 - handed to the worker thread, which raises it
            self.error = self.error or exc
            self.slot.done.set()

    def _receive(self) -> None:
        """Every push of the other workers, in arrival order, into the queue."""
        numel = sum(p.numel() for p in self.shard.master)
        remote = self.total - self.total // len(self.ranks)  # every worker's pushes but this rank's own
        for _ in range(remote):
            header = torch.zeros(3, dtype=torch.int64)
            self._wait(dist.irecv(header, src=None, group=self.push_group, tag=TAG_PUSH_HEADER), None)
            worker, step, base = (int(v) for v in header.tolist())
            grad = torch.empty(numel)
            self._wait(dist.irecv(grad, src=self.ranks[worker], group=self.push_group, tag=TAG_PUSH), worker)
            self.local.put(Push(worker, step, base, grad))

    def _serve(self) -> None:
        for handled in range(self.total):
            try:
                push = self.local.get(timeout=self.timeout_s)
            except queue.Empty:
                raise CollectiveError(f"parameter server on rank {self.ranks[self.me]}: no push for "
                                      f"{self.timeout_s:.0f} s ({handled} of {self.total} handled); a worker "
                                      "probably died or stalled") from None
            self.shard.receive(push)
            for worker in self.shard.ready():
                self._answer(worker, self.shard.reply(worker))
        for sent in self._sends:
            sent.wait(timedelta(seconds=self.timeout_s))

    def _wait(self, work: dist.Work, worker: int | None) -> None:
        peer = "any worker" if worker is None else f"rank {self.ranks[worker]}"
        if not work.wait(timedelta(seconds=self.timeout_s)):
            raise CollectiveError(f"parameter server on rank {self.ranks[self.me]}: timed out receiving a push "
                                  f"from {peer}")

    def _answer(self, worker: int, reply: Reply) -> None:
        if worker == self.me:
            self.slot.reply = reply
            self.slot.done.set()
            return
        dst = self.ranks[worker]
        head = torch.tensor([reply.version, reply.staleness], dtype=torch.int64)
        self._sends.append(dist.isend(head, dst=dst, group=self.pull_group, tag=TAG_PULL_HEADER))
        self._sends.append(dist.isend(reply.shard, dst=dst, group=self.pull_group, tag=TAG_PULL))
        self.counter.add_sent(reply.shard.numel() * reply.shard.element_size() + head.numel() * 8)


class ParameterServerClient:
    """A worker's side (and, on server ranks, the server thread): push gradients, pull parameters."""

    def __init__(self, plan: Plan, mesh: RankMesh, params: list[nn.Parameter], counter: WireCounter,
                 steps: int) -> None:
        if plan.spec.training.precision == "fp16":
            raise CollectiveError("allreduce: ps does not run fp16 loss scaling (its skipped steps need every worker "
                                  "in lockstep); use precision bf16 or fp32")
        group = mesh.group("dp")
        self.ranks = dist.get_process_group_ranks(group)
        self.me = self.ranks.index(mesh.rank)
        n = len(self.ranks)
        servers = plan.comm.ps_servers or n
        self.timeout_s = float(plan.collective_timeout_s)
        self.counter, self.params = counter, params
        owner = assign_shards([p.numel() for p in params], servers)
        self.shards = [[p for p, o in zip(params, owner) if o == j] for j in range(servers)]
        timeout = timedelta(seconds=plan.collective_timeout_s)
        self.groups = (dist.new_group(self.ranks, timeout=timeout), dist.new_group(self.ranks, timeout=timeout))
        self.bases = [0] * servers
        mode = plan.sync if plan.sync == "async" else "sync"
        self.server: ServerThread | None = None
        if self.me < servers:
            shard = Shard(plan, self.shards[self.me], n, mode, plan.comm.staleness)
            self.server = ServerThread(shard, self.me, self.ranks, self.groups, n * steps, self.timeout_s, counter)
            self.server.start()

    def _push(self, j: int, index: int) -> None:
        grad = flat([p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.shards[j]])
        grad = grad.to(torch.float32)
        if j == self.me:
            assert self.server is not None
            self.server.local.put(Push(self.me, index, self.bases[j], grad))
            return
        head = torch.tensor([self.me, index, self.bases[j]], dtype=torch.int64)
        push, pull = self.groups
        for tensor, tag in ((head, TAG_PUSH_HEADER), (grad, TAG_PUSH)):
            self._wait(dist.isend(tensor, dst=self.ranks[j], group=push, tag=tag), j, "push to")
        self.counter.add_sent(grad.numel() * 4 + 24)

    def _pull(self, j: int) -> Reply:
        if j == self.me:
            assert self.server is not None
            slot = self.server.slot
            if not slot.done.wait(self.timeout_s) or self.server.error is not None or slot.reply is None:
                raise self.server.error or CollectiveError(
                    f"rank {self.ranks[self.me]}: its parameter server thread gave no reply in {self.timeout_s:.0f} s")
            reply, slot.reply = slot.reply, None
            slot.done.clear()
            return reply
        head = torch.zeros(2, dtype=torch.int64)
        shard = torch.empty(sum(p.numel() for p in self.shards[j]))
        _, pull = self.groups
        self._wait(dist.irecv(head, src=self.ranks[j], group=pull, tag=TAG_PULL_HEADER), j, "pull from")
        self._wait(dist.irecv(shard, src=self.ranks[j], group=pull, tag=TAG_PULL), j, "pull from")
        return Reply(int(head[0]), int(head[1]), shard)

    def _wait(self, work: dist.Work, j: int, what: str) -> None:
        if self.server is not None and self.server.error is not None:
            raise self.server.error
        if not work.wait(timedelta(seconds=self.timeout_s)):
            raise CollectiveError(f"rank {self.ranks[self.me]}: timed out ({what} parameter server rank {self.ranks[j]})")

    def step(self, index: int, update: object) -> float:
        """Push this step's gradients, pull the new parameters; the largest observed staleness.
        (``update`` is unused: the servers apply the optimizer.)"""
        for j in range(len(self.shards)):
            self._push(j, index)
        staleness = 0
        with torch.no_grad():
            for j in range(len(self.shards)):
                reply = self._pull(j)
                offset = 0
                for p in self.shards[j]:
                    p.copy_(reply.shard[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
                self.bases[j] = reply.version
                staleness = max(staleness, reply.staleness)
        for p in self.params:
            p.grad = None
        return float(staleness)

    def finish(self) -> None:
        """Wait for this rank's server thread to answer every push."""
        if self.server is None:
            return
        for thread in (self.server.receiver, self.server.thread):
            thread.join(self.timeout_s)
        if self.server.error is not None:
            raise self.server.error
        if self.server.thread.is_alive() or self.server.receiver.is_alive():
            raise CollectiveError(f"rank {self.ranks[self.me]}: its parameter server thread did not finish in "
                                  f"{self.timeout_s:.0f} s")

    def close(self) -> None:
        pass
