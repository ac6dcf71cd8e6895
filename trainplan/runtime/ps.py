"""A parameter server over ``torch.distributed`` point-to-point (``allreduce: ps``).

The parameters are sharded, whole tensors, over ``comm.ps_servers`` servers, greedily: each tensor
to the server holding the fewest elements so far. Each server holds the master copy of its shard
and the optimizer for it (Li et al., "Scaling distributed machine learning with the parameter
server", OSDI 2014: workers push gradients, pull parameters; servers own key ranges and apply the
updates). Where the servers run is ``comm.ps_placement``:

* ``colocated`` (default): server ``j`` is a thread of the ``j``-th data-parallel rank's process
  (the first ``ps_servers`` of them; all by default), next to that rank's worker.
* ``dedicated``: ``ps_servers`` extra ranks after the mesh's (ranks ``W .. W+S-1`` for a mesh of
  ``W`` workers) run only the server (:func:`serve`): no model, no data, no forward or backward;
  worker 0 sends each its initial shard, and they exit once every worker's last push is answered.

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
its own server goes through a queue (torch refuses a send to self). A dedicated server's starting
values come from worker 0 on the push group (tag ``TAG_INIT``): ``[numel]`` then the flat fp32 shard.
Every wait has the plan's collective timeout.
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

TAG_PUSH_HEADER, TAG_PUSH, TAG_PULL_HEADER, TAG_PULL, TAG_INIT = 101, 102, 103, 104, 105
POLL_S = 0.2  # how often a waiting server thread looks whether its partner thread failed


@dataclass(frozen=True)
class Topology:
    """Who works and who serves: global ranks of the workers (the data-parallel ranks, in order) and
    of the servers; ``dedicated`` when the servers are ranks of their own."""

    workers: list[int]
    servers: list[int]
    dedicated: bool

    @property
    def ranks(self) -> list[int]:
        """Every rank taking part (the members of the parameter server's process groups)."""
        return sorted(set(self.workers) | set(self.servers))


def topology(plan: Plan) -> Topology:
    """The plan's parameter-server ranks. The parameter server runs on plain data parallelism
    (tp = pp = 1, checked before launch), so the workers are ranks ``0 .. dp-1``."""
    workers = list(range(plan.mesh.dp))
    dedicated = plan.ps_servers_dedicated
    if dedicated:
        return Topology(workers, list(range(plan.mesh.world_size, plan.mesh.world_size + dedicated)), True)
    return Topology(workers, workers[: plan.comm.ps_servers or len(workers)], False)


def make_groups(plan: Plan, topo: Topology) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """The push and the pull process group (every rank of the world calls this, in the same order)."""
    timeout = timedelta(seconds=plan.collective_timeout_s)
    return dist.new_group(topo.ranks, timeout=timeout), dist.new_group(topo.ranks, timeout=timeout)


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
        self.last_step = [0] * workers  # the step of each worker's last push

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
        self.last_step[push.worker] = push.step
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
    receive cannot be polled, so it blocks with the timeout) feeding a queue, and the server, which
    applies the queue in arrival order and replies. A co-located server's own worker (``local``, its
    index among the workers) puts its pushes on the queue and takes its replies from :attr:`slot`."""

    def __init__(self, shard: Shard, rank: int, workers: list[int], local: int | None,
                 groups: tuple[dist.ProcessGroup, dist.ProcessGroup], steps: int, timeout_s: float,
                 counter: WireCounter) -> None:
        self.shard, self.rank, self.workers, self.local = shard, rank, workers, local
        self.push_group, self.pull_group = groups
        self.steps, self.total = steps, len(workers) * steps
        self.timeout_s, self.counter = timeout_s, counter
        self.queue: queue.Queue[Push] = queue.Queue()
        self.slot = LocalSlot()
        self.error: BaseException | None = None
        self.sent_by_step = [0] * steps  # reply bytes, by the step of the push answered
        self._sends: list[dist.Work] = []
        self.thread = threading.Thread(target=self._guard, args=(self._serve,), name="trainplan-ps-server", daemon=True)
        self.receiver = threading.Thread(target=self._guard, args=(self._receive,), name="trainplan-ps-recv",
                                         daemon=True)

    @property
    def name(self) -> str:
        return f"{'dedicated ' if self.local is None else ''}parameter server on rank {self.rank}"

    def start(self) -> None:
        self.thread.start()
        self.receiver.start()

    def alive(self) -> bool:
        return self.thread.is_alive() or self.receiver.is_alive()

    def _guard(self, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread waiting on this server, which raises it
            self.error = self.error or exc
            self.slot.done.set()

    def _receive(self) -> None:
        """Every push of the remote workers, in arrival order, into the queue."""
        numel = sum(p.numel() for p in self.shard.master)
        remote = self.total - (self.steps if self.local is not None else 0)  # a co-located worker's own go direct
        for _ in range(remote):
            header = torch.zeros(3, dtype=torch.int64)
            self._wait(dist.irecv(header, src=None, group=self.push_group, tag=TAG_PUSH_HEADER), None)
            worker, step, base = (int(v) for v in header.tolist())
            grad = torch.empty(numel)
            self._wait(dist.irecv(grad, src=self.workers[worker], group=self.push_group, tag=TAG_PUSH), worker)
            self.queue.put(Push(worker, step, base, grad))

    def _next(self, handled: int) -> Push:
        """The next push; fails after the timeout, or at once when the receiver failed."""
        waited = 0.0
        while True:
            try:
                return self.queue.get(timeout=POLL_S)
            except queue.Empty:
                waited += POLL_S
            if self.error is not None:
                raise self.error
            if waited >= self.timeout_s:
                raise CollectiveError(f"{self.name}: no push for {self.timeout_s:.0f} s ({handled} of {self.total} "
                                      "handled); a worker probably died or stalled")

    def _serve(self) -> None:
        for handled in range(self.total):
            self.shard.receive(self._next(handled))
            for worker in self.shard.ready():
                self._answer(worker, self.shard.reply(worker))
        for sent in self._sends:
            if not sent.wait(timedelta(seconds=self.timeout_s)):
                raise CollectiveError(f"{self.name}: timed out sending a reply")

    def _wait(self, work: dist.Work, worker: int | None) -> None:
        peer = "any worker" if worker is None else f"worker rank {self.workers[worker]}"
        if not work.wait(timedelta(seconds=self.timeout_s)):
            raise CollectiveError(f"{self.name}: timed out receiving a push from {peer}")

    def _answer(self, worker: int, reply: Reply) -> None:
        if worker == self.local:
            self.slot.reply = reply
            self.slot.done.set()
            return
        dst = self.workers[worker]
        head = torch.tensor([reply.version, reply.staleness], dtype=torch.int64)
        self._sends.append(dist.isend(head, dst=dst, group=self.pull_group, tag=TAG_PULL_HEADER))
        self._sends.append(dist.isend(reply.shard, dst=dst, group=self.pull_group, tag=TAG_PULL))
        nbytes = reply.shard.numel() * reply.shard.element_size() + head.numel() * 8
        self.counter.add_sent(nbytes)
        self.sent_by_step[min(self.shard.last_step[worker], self.steps - 1)] += nbytes


class ParameterServerClient:
    """A worker's side (and, co-located, its rank's server thread): push gradients, pull parameters."""

    def __init__(self, plan: Plan, rank: int, params: list[nn.Parameter], counter: WireCounter, steps: int) -> None:
        if plan.spec.training.precision == "fp16":
            raise CollectiveError("allreduce: ps does not run fp16 loss scaling (its skipped steps need every worker "
                                  "in lockstep); use precision bf16 or fp32")
        self.topo = topology(plan)
        self.rank, self.me = rank, self.topo.workers.index(rank)
        servers = len(self.topo.servers)
        if servers > len(params):
            raise CollectiveError(f"comm.ps_servers ({servers}) exceeds the model's {len(params)} parameter tensors "
                                  f"(whole tensors are sharded, so a server would hold nothing); use at most {len(params)}")
        self.timeout_s = float(plan.collective_timeout_s)
        self.counter, self.params = counter, params
        owner = assign_shards([p.numel() for p in params], servers)
        self.shards = [[p for p, o in zip(params, owner) if o == j] for j in range(servers)]
        self.groups = make_groups(plan, self.topo)
        self.bases = [0] * servers
        mode = plan.sync if plan.sync == "async" else "sync"
        self.server: ServerThread | None = None
        self.local: int | None = None  # index of this rank's own (co-located) server
        if not self.topo.dedicated and self.me < servers:
            self.local = self.me
            shard = Shard(plan, self.shards[self.me], len(self.topo.workers), mode, plan.comm.staleness)
            self.server = ServerThread(shard, rank, self.topo.workers, self.me, self.groups, steps, self.timeout_s,
                                       counter)
            self.server.start()
        if self.topo.dedicated and self.me == 0:
            self._send_initial_shards()

    def _send_initial_shards(self) -> None:
        """Worker 0 gives each dedicated server its shard's starting values (every worker starts equal)."""
        push, _ = self.groups
        for j, server in enumerate(self.topo.servers):
            values = flat([p.detach() for p in self.shards[j]]).to(torch.float32)
            head = torch.tensor([values.numel()], dtype=torch.int64)
            for tensor in (head, values):
                self._wait(dist.isend(tensor, dst=server, group=push, tag=TAG_INIT), j, "send the initial shard to")

    def _push(self, j: int, index: int) -> None:
        grad = flat([p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.shards[j]])
        grad = grad.to(torch.float32)
        if j == self.local:
            if self.server is None:
                raise RuntimeError("internal error: no co-located server thread on this rank")
            self.server.queue.put(Push(self.me, index, self.bases[j], grad))
            return
        head = torch.tensor([self.me, index, self.bases[j]], dtype=torch.int64)
        push, _ = self.groups
        for tensor, tag in ((head, TAG_PUSH_HEADER), (grad, TAG_PUSH)):
            self._wait(dist.isend(tensor, dst=self.topo.servers[j], group=push, tag=tag), j, "push to")
        self.counter.add_sent(grad.numel() * 4 + 24)

    def _pull(self, j: int) -> Reply:
        if j == self.local:
            if self.server is None:
                raise RuntimeError("internal error: no co-located server thread on this rank")
            slot = self.server.slot
            if not slot.done.wait(self.timeout_s) or self.server.error is not None or slot.reply is None:
                raise self.server.error or CollectiveError(
                    f"rank {self.rank}: its parameter server thread gave no reply in {self.timeout_s:.0f} s")
            reply, slot.reply = slot.reply, None
            slot.done.clear()
            return reply
        head = torch.zeros(2, dtype=torch.int64)
        shard = torch.empty(sum(p.numel() for p in self.shards[j]))
        _, pull = self.groups
        self._wait(dist.irecv(head, src=self.topo.servers[j], group=pull, tag=TAG_PULL_HEADER), j, "pull from")
        self._wait(dist.irecv(shard, src=self.topo.servers[j], group=pull, tag=TAG_PULL), j, "pull from")
        return Reply(int(head[0]), int(head[1]), shard)

    def _wait(self, work: dist.Work, j: int, what: str) -> None:
        if self.server is not None and self.server.error is not None:
            raise self.server.error
        if not work.wait(timedelta(seconds=self.timeout_s)):
            kind = "dedicated parameter server" if self.topo.dedicated else "parameter server"
            raise CollectiveError(f"rank {self.rank}: timed out ({what} {kind} rank {self.topo.servers[j]})")

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
        if self.server.alive():
            raise CollectiveError(f"rank {self.rank}: its parameter server thread did not finish in "
                                  f"{self.timeout_s:.0f} s")

    def close(self) -> None:
        pass


def serve(plan: Plan, rank: int, steps: int, on_progress: Callable[[int], None] | None = None) -> ServerThread:
    """A dedicated server rank's whole run: take the initial shard from worker 0, then apply pushes
    and answer pulls until every worker's ``steps`` pushes are answered; the finished server.

    ``on_progress(k)`` is called (from this thread) each time every worker has pushed ``k`` steps.
    Every wait has the plan's collective timeout; a failure raises naming this server.
    """
    topo = topology(plan)
    timeout_s = float(plan.collective_timeout_s)
    groups = make_groups(plan, topo)
    name = f"dedicated parameter server on rank {rank}"
    src = topo.workers[0]

    def receive(tensor: torch.Tensor) -> torch.Tensor:
        if not dist.irecv(tensor, src=src, group=groups[0], tag=TAG_INIT).wait(timedelta(seconds=timeout_s)):
            raise CollectiveError(f"{name}: no initial shard from worker rank {src} in {timeout_s:.0f} s")
        return tensor

    values = receive(torch.empty(int(receive(torch.zeros(1, dtype=torch.int64)))))
    mode = plan.sync if plan.sync == "async" else "sync"
    # One flat tensor: the optimizers (SGD, Adam, AdamW) are elementwise, so this is the per-tensor update.
    shard = Shard(plan, [values], len(topo.workers), mode, plan.comm.staleness)
    server = ServerThread(shard, rank, topo.workers, None, groups, steps, timeout_s, WireCounter())
    server.start()
    reported = 0
    while server.alive():
        server.thread.join(POLL_S)
        if server.error is not None:
            break
        done = min(shard.pushes)
        while on_progress is not None and reported < done:
            reported += 1
            on_progress(reported)
    server.receiver.join(timeout_s)
    if server.error is not None:
        raise server.error
    return server
