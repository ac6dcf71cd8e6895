"""Pipeline schedules as data, and an event simulator that times them.

A schedule is, for each pipeline rank ("stage" here, as in Narayanan et al. 2021), the ordered list
of what that rank does: ``F`` (forward of one micro-batch through one model chunk), ``B`` (its
backward), and the point-to-point transfers between neighbouring chunks (``SEND_F``/``RECV_F`` for
activations, ``SEND_B``/``RECV_B`` for their gradients). Actions print and parse like
``torch.distributed.pipelining``'s ``_Action`` (``"2F0"``: stage 2, forward, micro-batch 0), with a
``c<chunk>`` suffix for chunks other than 0 (``"1B3c1"``).

With ``v`` chunks per rank (interleaving), rank ``r`` holds chunks ``r, r + p, …, r + (v−1)·p`` of
the ``p·v`` virtual stages (Narayanan et al. 2021, Sec. 2.2.2); chunk ``c`` of rank ``r`` is virtual
stage ``c·p + r``.

:func:`simulate` runs a schedule event by event with per-stage compute times and per-hop transfer
times and returns a :class:`Timeline`. For uniform stages and free transfers its bubble equals the
closed forms (:func:`bubble_closed_form`), which :func:`uniform_step_time` exposes as a cheap path
for the search; non-uniform stages (a heavy embedding or LM head) need the simulation.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

Kind = Literal["F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B"]
ScheduleName = Literal["gpipe", "1f1b", "interleaved"]
Schedule = tuple[tuple["Action", ...], ...]  # one ordered action list per pipeline rank

_KINDS = ("F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B")
_ACTION_RE = re.compile(r"(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B)(\d+)(?:c(\d+))?")


class ScheduleError(ValueError):
    """A schedule that cannot run: a missing or misordered action, or a deadlock."""


@dataclass(frozen=True, slots=True)
class Action:
    """One step of one pipeline rank: ``kind`` of micro-batch ``microbatch`` on model chunk ``chunk``."""

    stage: int
    kind: Kind
    microbatch: int
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; expected one of {', '.join(_KINDS)}")
        if min(self.stage, self.microbatch, self.chunk) < 0:
            raise ValueError(f"stage, microbatch and chunk must be non-negative, got {self!r}")

    def __str__(self) -> str:
        suffix = f"c{self.chunk}" if self.chunk else ""
        return f"{self.stage}{self.kind}{self.microbatch}{suffix}"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """The inverse of ``str``: ``"2F0"`` → ``Action(2, "F", 0)``, ``"1SEND_B3c1"`` → chunk 1."""
        match = _ACTION_RE.fullmatch(text.strip())
        if match is None:
            raise ValueError(
                f"invalid action {text!r}; expected <stage><kind><microbatch>[c<chunk>] with kind one of "
                f"{', '.join(_KINDS)}, e.g. '2F0' or '1B3c1'"
            )
        stage, kind, mb, chunk = match.groups()
        return cls(int(stage), kind, int(mb), int(chunk or 0))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ generators


def _with_transfers(order: Sequence[Sequence[tuple[str, int, int]]], p: int, v: int) -> Schedule:
    """Per-rank compute orders ``(kind, microbatch, chunk)`` with receives before and sends after.

    A forward needs the previous virtual stage's activation and sends its own to the next; a
    backward needs the next stage's gradient and sends one to the previous.
    """
    last = p * v - 1
    out = []
    for r, ops in enumerate(order):
        acts: list[Action] = []
        for kind, mb, c in ops:
            vs = c * p + r
            source, sink = (0, last) if kind == "F" else (last, 0)  # where this direction starts and ends
            if vs != source:
                acts.append(Action(r, "RECV_F" if kind == "F" else "RECV_B", mb, c))
            acts.append(Action(r, kind, mb, c))  # type: ignore[arg-type]
            if vs != sink:
                acts.append(Action(r, "SEND_F" if kind == "F" else "SEND_B", mb, c))
        out.append(tuple(acts))
    return tuple(out)


def _check_pm(p: int, m: int) -> None:
    if p <= 0 or m <= 0:
        raise ValueError(f"a pipeline needs p >= 1 stages and m >= 1 micro-batches, got p={p}, m={m}")


@cache
def gpipe(p: int, m: int) -> Schedule:
    """GPipe (Huang et al. 2019): every rank runs all ``m`` forwards, then all ``m`` backwards."""
    _check_pm(p, m)
    order = [[("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)] for _ in range(p)]
    return _with_transfers(order, p, 1)


@cache
def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B / PipeDream-Flush (Narayanan et al. 2021, Sec. 2.2.1; Megatron-LM's non-interleaved schedule).

    Rank ``r`` runs ``min(p − r − 1, m)`` warm-up forwards, then alternates one forward and one
    backward, then drains the remaining backwards.
    """
    _check_pm(p, m)
    order = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        ops = [("F", i, 0) for i in range(warmup)]
        for i in range(m - warmup):
            ops += [("F", warmup + i, 0), ("B", i, 0)]
        ops += [("B", i, 0) for i in range(m - warmup, m)]
        order.append(ops)
    return _with_transfers(order, p, 1)


@cache
def interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """Interleaved 1F1B with ``v`` model chunks per rank (Narayanan et al. 2021, Sec. 2.2.2).

    Megatron-LM's order: micro-batches go through the chunks in groups of ``p``; the ``k``-th
    forward of a rank is micro-batch ``(k // (p·v))·p + k mod p`` on chunk ``(k // p) mod v``, the
    ``k``-th backward the same micro-batch on chunk ``v − 1 − (k // p) mod v``. Rank ``r`` runs
    ``(v − 1)·p + 2·(p − 1 − r)`` warm-up forwards, then alternates, then drains. Like Megatron-LM
    this needs ``m`` to be a multiple of ``p``.
    """
    _check_pm(p, m)
    if v < 2:
        raise ValueError(f"interleaved 1F1B needs v >= 2 model chunks per stage, got v={v}; use 1f1b for one chunk")
    if m % p:
        raise ValueError(
            f"interleaved 1F1B needs the micro-batch count to be a multiple of the pipeline stages "
            f"(Megatron-LM's rule), got m={m}, p={p}; use m={(m // p + 1) * p} or the 1f1b schedule"
        )
    total = m * v

    def fwd(k: int) -> tuple[str, int, int]:
        return ("F", (k // (p * v)) * p + k % p, (k // p) % v)

    def bwd(k: int) -> tuple[str, int, int]:
        return ("B", (k // (p * v)) * p + k % p, v - 1 - (k // p) % v)

    order = []
    for r in range(p):
        warmup = min((v - 1) * p + 2 * (p - 1 - r), total)
        ops = [fwd(k) for k in range(warmup)]
        for i in range(total - warmup):
            ops += [fwd(warmup + i), bwd(i)]
        ops += [bwd(k) for k in range(total - warmup, total)]
        order.append(ops)
    return _with_transfers(order, p, v)


def build(schedule: ScheduleName, p: int, m: int, v: int = 1) -> Schedule:
    """The named schedule; ``v`` applies to ``interleaved`` only."""
    if schedule == "gpipe":
        return gpipe(p, m)
    if schedule == "1f1b":
        return one_f_one_b(p, m)
    if schedule == "interleaved":
        return interleaved_1f1b(p, m, v)
    raise ValueError(f"unknown schedule {schedule!r}; expected 'gpipe', '1f1b' or 'interleaved'")


def format_schedule(schedule: Schedule) -> str:
    """One line per rank: ``"0: 0F0 0SEND_F0 …"``, parseable by :func:`parse_schedule`."""
    return "\n".join(f"{r}: " + " ".join(map(str, acts)) for r, acts in enumerate(schedule))


def parse_schedule(text: str) -> Schedule:
    """The inverse of :func:`format_schedule`."""
    ranks = []
    for r, line in enumerate(text.strip().splitlines()):
        label, _, body = line.partition(":")
        if label.strip() != str(r):
            raise ValueError(f"line {r + 1}: expected it to start with '{r}:', got {line!r}")
        ranks.append(tuple(Action.parse(tok) for tok in body.split()))
    return tuple(ranks)


# -------------------------------------------------------------------------------- closed forms


def bubble_closed_form(schedule: ScheduleName, p: int, m: int, v: int = 1) -> float:
    """Pipeline bubble as Narayanan et al. 2021 define it (Sec. 2.2): bubble time / ideal time.

    ``t_pb / t_id`` where ``t_id = m·(t_f + t_b)`` is a rank's compute and ``t_pb`` its idle time
    in one step: ``(p − 1)/m`` for GPipe and 1F1B (Sec. 2.2.1), ``(p − 1)/(v·m)`` for interleaved
    1F1B with ``v`` chunks per rank (Sec. 2.2.2). Uniform stages, free transfers.
    """
    _check_pm(p, m)
    if schedule in ("gpipe", "1f1b"):
        return (p - 1) / m
    if schedule == "interleaved":
        if v <= 0:
            raise ValueError(f"v must be positive, got {v}")
        return (p - 1) / (v * m)
    raise ValueError(f"unknown schedule {schedule!r}; expected 'gpipe', '1f1b' or 'interleaved'")


def uniform_step_time(schedule: ScheduleName, p: int, m: int, v: int, fwd_s: float, bwd_s: float) -> float:
    """Seconds of one pipelined step with identical stages and free transfers: ``t_id + t_pb``.

    ``t_id = m·(t_f + t_b)`` and ``t_pb = (p − 1)·(t_f + t_b)/v`` (``v = 1`` for GPipe and 1F1B;
    Narayanan et al. 2021, Sec. 2.2), with ``fwd_s``/``bwd_s`` one rank's forward/backward time of
    one micro-batch over all its chunks. Equal to :func:`simulate`'s makespan in that case; O(1),
    for the search's inner loop. With transfer time it is only a lower bound: in 1F1B's steady
    state each forward waits for a gradient that made a round trip to the next stage, so transfers
    add to the step in a way that depends on ``p`` and ``m`` — simulate those.
    """
    bubble_closed_form(schedule, p, m, v)  # validates the arguments
    chunks = v if schedule == "interleaved" else 1
    return m * (fwd_s + bwd_s) + (p - 1) * (fwd_s + bwd_s) / chunks


# ----------------------------------------------------------------------------------- simulation

_F, _B, _RECV, _SEND = range(4)
_CODE = {"F": _F, "B": _B, "RECV_F": _RECV, "RECV_B": _RECV, "SEND_F": _SEND, "SEND_B": _SEND}


@dataclass(frozen=True, slots=True)
class Event:
    """An action and when it ran, in seconds from the step's start (a transfer: on its link)."""

    action: Action
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Timeline:
    """The simulated step: when each rank computed, the transfers, and the bubble figures.

    ``compute[r][j]`` ran on rank ``r`` from ``start[r][j]`` to ``end[r][j]`` (seconds); the raw
    arrays keep :func:`simulate` cheap, :meth:`events` pairs them up.
    """

    compute: tuple[tuple[Action, ...], ...]  # F and B of each rank, in execution order
    start: tuple[tuple[float, ...], ...]
    end: tuple[tuple[float, ...], ...]
    transfers: tuple[Event, ...]  # SEND_F/SEND_B, timed on their directed link
    makespan: float  # end of the last action, seconds
    busy: tuple[float, ...]  # compute seconds of each rank

    def events(self, rank: int) -> list[Event]:
        """The compute events of ``rank`` in execution order."""
        return [Event(a, s, e) for a, s, e in zip(self.compute[rank], self.start[rank], self.end[rank])]

    @property
    def idle_fraction(self) -> tuple[float, ...]:
        """Idle time over the step's duration, per rank: ``(makespan − busy)/makespan``."""
        return tuple((self.makespan - b) / self.makespan if self.makespan else 0.0 for b in self.busy)

    @property
    def bubble_fraction(self) -> tuple[float, ...]:
        """Idle time over compute time, per rank: Narayanan et al.'s ``t_pb / t_id`` (Sec. 2.2)."""
        return tuple((self.makespan - b) / b if b else 0.0 for b in self.busy)


def _hop_times(p2p_s: float | Sequence[float], hops: int) -> list[float]:
    if isinstance(p2p_s, (int, float)):
        times = [float(p2p_s)] * hops
    else:
        times = [float(t) for t in p2p_s]
        if len(times) != hops:
            raise ValueError(f"expected {hops} transfer times (one per boundary between virtual stages), got {len(times)}")
    if any(t < 0 for t in times):
        raise ValueError(f"transfer times must be non-negative, got {p2p_s}")
    return times


def _check_times(fwd_s: Sequence[Sequence[float]], bwd_s: Sequence[Sequence[float]], p: int) -> int:
    if p == 0 or len(fwd_s) != p or len(bwd_s) != p:
        raise ValueError(f"expected forward and backward times for {p} stages, got {len(fwd_s)} and {len(bwd_s)}")
    v = len(fwd_s[0])
    for k in range(p):
        if len(fwd_s[k]) != v or len(bwd_s[k]) != v:
            raise ValueError(f"stage {k}: expected times for {v} chunks, got {len(fwd_s[k])} and {len(bwd_s[k])}")
        if min(fwd_s[k]) < 0 or min(bwd_s[k]) < 0:
            raise ValueError(f"stage {k}: compute times must be non-negative")
    return v


_Op = tuple[int, int, int, int, int, int]  # code, chunk, key, other key, link, hop index


def _compile(schedule: Sequence[Sequence[Action]], p: int, n_virtual: int) -> list[list[_Op]]:
    """Actions as integer tuples. A message or result is keyed ``2·(mb·n_virtual + vs) + d`` with
    ``d`` 0 for forward, 1 for backward; for a compute op the second key is that of its input
    message (−1 when the virtual stage needs none), for a send the key at the receiver."""
    out = []
    for r, acts in enumerate(schedule):
        ops = []
        for a in acts:
            if a.stage != r:
                raise ScheduleError(f"action {a} is listed under rank {r}")
            vs = a.chunk * p + r
            if vs >= n_virtual:
                raise ScheduleError(f"{a}: chunk {a.chunk} does not exist with {n_virtual // p} chunks per rank")
            backward = a.kind[-1] == "B"
            key = 2 * (a.microbatch * n_virtual + vs) + backward
            code = _CODE[a.kind]
            if code == _SEND:
                dest = vs - 1 if backward else vs + 1
                if not 0 <= dest < n_virtual:
                    raise ScheduleError(f"{a} sends past the end of the pipeline")
                ops.append((code, a.chunk, key, key + (-2 if backward else 2), r * p + dest % p, min(vs, dest)))
            else:
                needs_input = vs < n_virtual - 1 if backward else vs > 0
                ops.append((code, a.chunk, key, key if needs_input else -1, 0, 0))
        out.append(ops)
    return out


@dataclass(frozen=True, slots=True)
class CompiledSchedule:
    """A schedule checked and turned into integer operations once, to be simulated many times."""

    actions: tuple[tuple[Action, ...], ...]
    ops: tuple[tuple[_Op, ...], ...]
    compute: tuple[tuple[Action, ...], ...]  # the F and B actions of each rank, in order
    p: int
    v: int


def compile_schedule(schedule: Sequence[Sequence[Action]], v: int | None = None) -> CompiledSchedule:
    """Check ``schedule``'s actions and encode them for :func:`simulate`; ``O(number of actions)``.

    ``v`` (chunks per rank) defaults to one more than the largest chunk index used.
    """
    actions = tuple(tuple(acts) for acts in schedule)
    p = len(actions)
    if p == 0:
        raise ValueError("a schedule needs at least one rank")
    if v is None:
        v = 1 + max((a.chunk for acts in actions for a in acts), default=0)
    compute = tuple(tuple(a for a in acts if a.kind == "F" or a.kind == "B") for acts in actions)
    ops = tuple(tuple(ops) for ops in _compile(actions, p, p * v))
    return CompiledSchedule(actions, ops, compute, p, v)


@cache
def compiled(schedule: ScheduleName, p: int, m: int, v: int = 1) -> CompiledSchedule:
    """The named schedule, compiled once per ``(schedule, p, m, v)`` (the search's fast path)."""
    return compile_schedule(build(schedule, p, m, v), v)


def simulate(
    schedule: Sequence[Sequence[Action]] | CompiledSchedule,
    fwd_s: Sequence[Sequence[float]],
    bwd_s: Sequence[Sequence[float]],
    p2p_s: float | Sequence[float] = 0.0,
) -> Timeline:
    """Run ``schedule`` event by event and time it.

    ``fwd_s[r][c]``/``bwd_s[r][c]``: seconds of one micro-batch's forward/backward on chunk ``c`` of
    rank ``r``. ``p2p_s``: seconds of one transfer, one number or one per boundary ``b`` between
    virtual stages ``b`` and ``b + 1`` (both directions). Semantics, as torch's pipelining runtime:
    a rank runs its actions in order; ``RECV_*`` blocks until the message has arrived; ``SEND_*`` is
    asynchronous (the rank goes on computing) and occupies the directed link from the sending to the
    receiving rank, so transfers on one link run one at a time.

    Cost ``O(number of actions) = O(p·m·v)``: a rank runs until it blocks on a receive and is
    resumed only by the send it waits for, so each action is executed once. Pass a
    :class:`CompiledSchedule` (:func:`compiled`) to skip the checks and encoding when simulating
    one schedule with many stage times.

    Raises :class:`ScheduleError` for a forward without its input, a backward before its forward, a
    send of something not computed, a message never received, or a deadlock.
    """
    if not isinstance(schedule, CompiledSchedule):
        schedule = compile_schedule(schedule, len(fwd_s[0]) if len(fwd_s) else None)
    v = _check_times(fwd_s, bwd_s, schedule.p)
    if v != schedule.v:
        raise ValueError(f"the schedule has {schedule.v} chunks per rank but times are given for {v}")
    return _run(schedule, fwd_s, bwd_s, _hop_times(p2p_s, schedule.p * v - 1))


def _run(
    schedule: CompiledSchedule,
    fwd_s: Sequence[Sequence[float]],
    bwd_s: Sequence[Sequence[float]],
    hop: list[float],
) -> Timeline:
    p, compiled_ops = schedule.p, schedule.ops
    pos, clock, busy = [0] * p, [0.0] * p, [0.0] * p
    iters = [iter(ops) for ops in compiled_ops]
    blocked = [False] * p
    link_free = [0.0] * (p * p)
    done: dict[int, float] = {}  # result key -> time it was computed
    arrival: dict[int, float] = {}  # message key at the receiver -> time it arrives
    received: set[int] = set()
    waiting: dict[int, int] = {}  # message key -> the rank blocked on it
    starts: list[list[float]] = [[] for _ in range(p)]
    ends: list[list[float]] = [[] for _ in range(p)]
    sent: list[tuple[int, int, float, float]] = []  # rank, action index, start, end
    ready = deque(range(p))
    while ready:
        r = ready.popleft()
        i, t, times = pos[r], clock[r], (fwd_s[r], bwd_s[r])
        if blocked[r]:
            # Resumed by the send its receive waited for; the iterator is already past that receive.
            key = compiled_ops[r][i][2]
            received.add(key)
            t = max(t, arrival[key])
            i, blocked[r] = i + 1, False
        for code, chunk, key, other, link, boundary in iters[r]:
            if code == _RECV:
                arrived = arrival.get(key)
                if arrived is None:
                    waiting[key], blocked[r] = r, True
                    break
                received.add(key)
                if arrived > t:
                    t = arrived
            elif code == _SEND:
                if key not in done:
                    raise ScheduleError(f"{schedule.actions[r][i]} sends a result before computing it")
                begin = link_free[link] if link_free[link] > t else t
                link_free[link] = arrival[other] = begin + hop[boundary]
                sent.append((r, i, begin, begin + hop[boundary]))
                if other in waiting:
                    ready.append(waiting.pop(other))
            else:
                if key in done or (other >= 0 and other not in received) or (code == _B and key - 1 not in done):
                    raise ScheduleError(_compute_problem(schedule.actions[r][i], key in done, code == _B))
                duration = times[code][chunk]
                starts[r].append(t)
                t += duration
                ends[r].append(t)
                done[key] = t
                busy[r] += duration
            i += 1
        pos[r], clock[r] = i, t
    _check_finished(schedule, pos, set(arrival) - received)
    return _timeline(schedule, starts, ends, sent, busy)


def _compute_problem(a: Action, repeated: bool, backward: bool) -> str:
    if repeated:
        return f"{a} runs micro-batch {a.microbatch} of chunk {a.chunk} a second time"
    recv = Action(a.stage, "RECV_B" if backward else "RECV_F", a.microbatch, a.chunk)
    if backward:
        return f"{a} needs {Action(a.stage, 'F', a.microbatch, a.chunk)} before it and, unless its chunk is the last, {recv}"
    return f"{a} has no input: add {recv} before it"


def _check_finished(schedule: CompiledSchedule, pos: list[int], unread: set[int]) -> None:
    acts, p, n_virtual = schedule.actions, schedule.p, schedule.p * schedule.v
    stuck = [f"rank {r} waits at {acts[r][pos[r]]}" for r in range(p) if pos[r] < len(acts[r])]
    if stuck:
        raise ScheduleError("deadlock: " + "; ".join(stuck) + " and no rank can proceed")
    if unread:
        mb, vs = divmod(min(unread) // 2, n_virtual)
        kind = "RECV_B" if min(unread) % 2 else "RECV_F"
        missing = Action(vs % p, kind, mb, vs // p)  # type: ignore[arg-type]
        raise ScheduleError(f"{len(unread)} message(s) sent but never received, e.g. add {missing}")


def _timeline(
    schedule: CompiledSchedule,
    starts: list[list[float]],
    ends: list[list[float]],
    sent: list[tuple[int, int, float, float]],
    busy: list[float],
) -> Timeline:
    transfers = tuple(Event(schedule.actions[r][i], s, e) for r, i, s, e in sent)
    last = [e[-1] for e in ends if e] + [s[3] for s in sent]
    return Timeline(
        compute=schedule.compute,
        start=tuple(map(tuple, starts)),
        end=tuple(map(tuple, ends)),
        transfers=transfers,
        makespan=max(last, default=0.0),
        busy=tuple(busy),
    )


def peak_in_flight(actions: Sequence[Action]) -> int:
    """Most (chunk, micro-batch) forwards whose backward has not yet run, over one rank's list.

    The count the activation memory of a rank scales with (Korthikanti et al. 2022, Sec. 4.2.3).
    """
    live = peak = 0
    for a in actions:
        if a.kind == "F":
            live += 1
            peak = max(peak, live)
        elif a.kind == "B":
            live -= 1
    return peak
