"""Pipeline schedules: actions as data, generators, the event simulator and the closed forms."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainplan.planner import schedule as sch
from trainplan.planner.schedule import Action, ScheduleError

NAMES = ["gpipe", "1f1b", "interleaved"]


def uniform(p: int, v: int, per_stage: float) -> list[list[float]]:
    """Each rank takes ``per_stage`` for one micro-batch over all its ``v`` chunks."""
    return [[per_stage / v] * v for _ in range(p)]


@st.composite
def layouts(draw: st.DrawFn, max_p: int = 8) -> tuple[str, int, int, int]:
    name = draw(st.sampled_from(NAMES))
    p = draw(st.integers(1, max_p))
    if name == "interleaved":
        v = draw(st.integers(2, 4))
        m = p * draw(st.integers(1, 6))
    else:
        v, m = 1, draw(st.integers(1, 24))
    return name, p, m, v


# ------------------------------------------------------------------------------------- actions


@given(stage=st.integers(0, 99), kind=st.sampled_from(["F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B"]),
       mb=st.integers(0, 999), chunk=st.integers(0, 9))
def test_action_round_trips_through_text(stage: int, kind: str, mb: int, chunk: int) -> None:
    a = Action(stage, kind, mb, chunk)  # type: ignore[arg-type]
    assert Action.parse(str(a)) == a


@pytest.mark.slow  # importing torch.distributed.pipelining takes seconds on a busy 2-core machine
def test_action_text_matches_torch_pipelining() -> None:
    from torch.distributed.pipelining.schedules import _Action

    for text in ("2F0", "0B13", "1SEND_F4", "3RECV_B0"):
        ours, theirs = Action.parse(text), _Action.from_str(text)
        assert (ours.stage, ours.kind, ours.microbatch) == (theirs.stage_index, theirs.computation_type.value, theirs.microbatch_index)
        assert str(ours) == repr(theirs) == text
    assert str(Action(1, "B", 3, 1)) == "1B3c1"


@pytest.mark.parametrize("text", ["F0", "2X0", "2F", "2F0c", "-1F0", "2F0 1F0"])
def test_action_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid action"):
        Action.parse(text)


def test_action_validates_fields() -> None:
    with pytest.raises(ValueError, match="kind"):
        Action(0, "W", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        Action(0, "F", -1)


@settings(max_examples=20, deadline=None)
@given(layouts(max_p=4))
def test_schedule_round_trips_through_text(layout: tuple[str, int, int, int]) -> None:
    name, p, m, v = layout
    s = sch.build(name, p, m, v)  # type: ignore[arg-type]
    assert sch.parse_schedule(sch.format_schedule(s)) == s


# ---------------------------------------------------------------------------------- generators


@settings(max_examples=40, deadline=None)
@given(layouts())
def test_generated_schedules_are_complete(layout: tuple[str, int, int, int]) -> None:
    name, p, m, v = layout
    s = sch.build(name, p, m, v)  # type: ignore[arg-type]
    assert len(s) == p
    for r, acts in enumerate(s):
        assert all(a.stage == r for a in acts)
        counts = Counter((a.kind, a.chunk, a.microbatch) for a in acts if a.kind in ("F", "B"))
        assert set(counts.values()) == {1}
        assert set(counts) == {(k, c, i) for k in "FB" for c in range(v) for i in range(m)}
        seen_f = set()
        for a in acts:  # every micro-batch's F precedes its B on the rank
            if a.kind == "F":
                seen_f.add((a.chunk, a.microbatch))
            elif a.kind == "B":
                assert (a.chunk, a.microbatch) in seen_f
    sends = Counter((a.kind[-1], a.chunk * p + a.stage, a.microbatch) for acts in s for a in acts if a.kind.startswith("SEND"))
    recvs = Counter((a.kind[-1], a.chunk * p + a.stage, a.microbatch) for acts in s for a in acts if a.kind.startswith("RECV"))
    assert sum(sends.values()) == sum(recvs.values()) == 2 * m * (p * v - 1)


def test_one_f_one_b_order() -> None:
    s = sch.one_f_one_b(3, 4)
    compute = [" ".join(str(a) for a in acts if a.kind in "FB") for acts in s]
    assert compute == [
        "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3",
        "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3",
        "2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3",
    ]


def test_interleaved_order_matches_megatron() -> None:
    # p=2, v=2, m=4: forwards go through chunk 0 for micro-batches 0,1, then chunk 1 for 0,1, ...
    s = sch.interleaved_1f1b(2, 4, 2)
    rank0 = [str(a) for a in s[0] if a.kind in "FB"]
    assert rank0[:6] == ["0F0", "0F1", "0F0c1", "0F1c1", "0F2", "0B0c1"]


def test_interleaved_requires_m_multiple_of_p_and_two_chunks() -> None:
    with pytest.raises(ValueError, match=r"multiple of the pipeline stages.*m=6, p=4.*use m=8"):
        sch.interleaved_1f1b(4, 6, 2)
    with pytest.raises(ValueError, match="v >= 2"):
        sch.interleaved_1f1b(4, 8, 1)
    with pytest.raises(ValueError, match="p >= 1"):
        sch.gpipe(0, 4)
    with pytest.raises(ValueError, match="unknown schedule"):
        sch.build("zb", 2, 2)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- closed forms


@settings(max_examples=80, deadline=None)
@given(layout=layouts(), tf=st.integers(1, 5), tb=st.integers(1, 10))
def test_uniform_bubble_equals_closed_form_exactly(layout: tuple[str, int, int, int], tf: int, tb: int) -> None:
    """Narayanan et al. 2021 Sec. 2.2: bubble time / ideal time = (p−1)/m, (p−1)/(v·m) interleaved."""
    name, p, m, v = layout
    # Whole-number chunk times (v·tf per rank, tf per chunk): every sum is exact in binary floating point.
    timeline = sch.simulate(sch.build(name, p, m, v), uniform(p, v, v * tf), uniform(p, v, v * tb))  # type: ignore[arg-type]
    closed = sch.bubble_closed_form(name, p, m, v)  # type: ignore[arg-type]
    ideal = m * v * (tf + tb)
    assert timeline.busy == (ideal,) * p
    # Integer arithmetic: the bubble is (p−1) chunk round trips, (p−1)·(t_f + t_b)/v per rank.
    assert timeline.makespan == ideal + (p - 1) * (tf + tb)
    assert all(b == pytest.approx(closed, rel=1e-15, abs=0) for b in timeline.bubble_fraction)
    step = sch.uniform_step_time(name, p, m, v, v * tf, v * tb)  # type: ignore[arg-type]
    assert step == pytest.approx(timeline.makespan, rel=1e-15)
    assert all(f == pytest.approx(closed / (1 + closed)) for f in timeline.idle_fraction)


@settings(max_examples=40, deadline=None)
@given(layout=layouts(), tf=st.floats(1e-4, 1.0), tb=st.floats(1e-4, 1.0))
def test_uniform_bubble_with_arbitrary_times(layout: tuple[str, int, int, int], tf: float, tb: float) -> None:
    name, p, m, v = layout
    timeline = sch.simulate(sch.compiled(name, p, m, v), uniform(p, v, tf), uniform(p, v, tb))  # type: ignore[arg-type]
    closed = sch.bubble_closed_form(name, p, m, v)  # type: ignore[arg-type]
    assert all(b == pytest.approx(closed, rel=1e-9, abs=1e-12) for b in timeline.bubble_fraction)


def test_closed_form_values() -> None:
    assert sch.bubble_closed_form("1f1b", 8, 64) == 7 / 64
    assert sch.bubble_closed_form("gpipe", 8, 64) == 7 / 64
    assert sch.bubble_closed_form("interleaved", 8, 64, 4) == 7 / 256


def test_single_stage_has_no_bubble() -> None:
    t = sch.simulate(sch.one_f_one_b(1, 5), [[1.0]], [[2.0]], [])
    assert t.makespan == 15.0 and t.bubble_fraction == (0.0,)


# ------------------------------------------------------------------------- non-uniform and p2p


def reference_times(
    schedule: Sequence[Sequence[Action]], fwd: list[list[float]], bwd: list[list[float]], hop: list[float]
) -> float:
    """Makespan by fixed-point relaxation of the dependency graph (independent of the event queue)."""
    p = len(schedule)
    v = len(fwd[0])
    done: list[list[float | None]] = [[None] * len(a) for a in schedule]
    arrival: dict[tuple[str, int, int], float] = {}
    link_end: dict[tuple[int, int], list[float]] = {}
    ends = [0.0]
    changed = True
    while changed:
        changed = False
        for r, acts in enumerate(schedule):
            for i, a in enumerate(acts):
                if done[r][i] is not None:
                    continue
                ready = 0.0 if i == 0 else done[r][i - 1]
                if ready is None:
                    break
                vs = a.chunk * p + r
                if a.kind in ("F", "B"):
                    end = ready + (fwd if a.kind == "F" else bwd)[r][a.chunk]
                    ends.append(end)
                elif a.kind.startswith("RECV"):
                    key = (a.kind[-1], vs, a.microbatch)
                    if key not in arrival:
                        break
                    end = max(ready, arrival[key])
                else:
                    dest = vs + 1 if a.kind == "SEND_F" else vs - 1
                    link = link_end.setdefault((r, dest % p), [0.0])
                    start = max(ready, link[-1])
                    link.append(start + hop[min(vs, dest)])
                    arrival[(a.kind[-1], dest, a.microbatch)] = start + hop[min(vs, dest)]
                    ends.append(start + hop[min(vs, dest)])
                    end = ready
                done[r][i] = end
                changed = True
    assert all(x is not None for row in done for x in row), "reference: schedule did not finish"
    del v
    return max(ends)


@settings(max_examples=60, deadline=None)
@given(layouts(max_p=5), st.data())
def test_simulation_equals_reference_for_any_times(layout: tuple[str, int, int, int], data: st.DataObject) -> None:
    name, p, m, v = layout
    times = st.lists(st.lists(st.floats(0.0, 3.0), min_size=v, max_size=v), min_size=p, max_size=p)
    fwd, bwd = data.draw(times), data.draw(times)
    hop = data.draw(st.lists(st.floats(0.0, 2.0), min_size=p * v - 1, max_size=p * v - 1))
    s = sch.build(name, p, m, v)  # type: ignore[arg-type]
    timeline = sch.simulate(s, fwd, bwd, hop)
    assert timeline.makespan == pytest.approx(reference_times(s, fwd, bwd, hop), rel=1e-12, abs=1e-12)
    assert timeline.makespan >= max(timeline.busy) - 1e-12
    # Micro-batch 0's round trip through every virtual stage is a dependency chain.
    chain = sum(fwd[vs % p][vs // p] + bwd[vs % p][vs // p] for vs in range(p * v)) + 2 * sum(hop)
    assert timeline.makespan >= chain - 1e-9


@settings(max_examples=40, deadline=None)
@given(layouts(max_p=5), st.data())
def test_events_respect_dependencies(layout: tuple[str, int, int, int], data: st.DataObject) -> None:
    name, p, m, v = layout
    times = st.lists(st.lists(st.floats(0.01, 3.0), min_size=v, max_size=v), min_size=p, max_size=p)
    fwd, bwd, c = data.draw(times), data.draw(times), data.draw(st.floats(0.0, 1.0))
    timeline = sch.simulate(sch.build(name, p, m, v), fwd, bwd, c)  # type: ignore[arg-type]
    when: dict[tuple[str, int, int], tuple[float, float]] = {}
    for r in range(p):
        events = timeline.events(r)
        for prev, nxt in zip(events, events[1:]):
            assert nxt.start >= prev.end  # a rank computes one thing at a time
        for e in events:
            when[(e.action.kind, e.action.chunk * p + r, e.action.microbatch)] = (e.start, e.end)
    eps = 1e-9
    for (kind, vs, mb), (start, _end) in when.items():
        if kind == "F" and vs > 0:
            assert start >= when[("F", vs - 1, mb)][1] + c - eps
        if kind == "B":
            assert start >= when[("F", vs, mb)][1] - eps
            if vs < p * v - 1:
                assert start >= when[("B", vs + 1, mb)][1] + c - eps


@settings(max_examples=40, deadline=None)
@given(layouts(max_p=5), st.data())
def test_makespan_is_monotone_in_stage_times(layout: tuple[str, int, int, int], data: st.DataObject) -> None:
    name, p, m, v = layout
    times = st.lists(st.lists(st.floats(0.0, 3.0), min_size=v, max_size=v), min_size=p, max_size=p)
    fwd, bwd = data.draw(times), data.draw(times)
    r, c, extra = data.draw(st.integers(0, p - 1)), data.draw(st.integers(0, v - 1)), data.draw(st.floats(0.0, 2.0))
    compiled = sch.compiled(name, p, m, v)  # type: ignore[arg-type]
    base = sch.simulate(compiled, fwd, bwd, 0.1).makespan
    slower = [row[:] for row in fwd]
    slower[r][c] += extra
    assert sch.simulate(compiled, slower, bwd, 0.1).makespan >= base - 1e-12
    assert sch.simulate(compiled, fwd, bwd, 0.3).makespan >= base - 1e-12


def test_heavy_first_and_last_stages_come_out_of_the_simulation() -> None:
    # Embedding on stage 0 and LM head on stage 3 make them slower than the middle.
    fwd = [[1.5], [1.0], [1.0], [2.0]]
    bwd = [[3.0], [2.0], [2.0], [4.0]]
    t = sch.simulate(sch.one_f_one_b(4, 8), fwd, bwd)
    slowest = max(f[0] + b[0] for f, b in zip(fwd, bwd))
    assert t.makespan >= 8 * slowest
    # The uniform closed form with the average stage would underestimate it.
    mean = sum(f[0] + b[0] for f, b in zip(fwd, bwd)) / 4
    assert t.makespan > sch.uniform_step_time("1f1b", 4, 8, 1, mean, 0.0)
    assert t.busy == (36.0, 24.0, 24.0, 48.0)


def test_compiled_and_plain_simulation_agree() -> None:
    fwd, bwd = [[1.0, 0.5], [0.7, 0.9], [1.2, 0.3]], [[2.0, 1.0], [1.5, 1.7], [2.2, 0.8]]
    plain = sch.simulate(sch.interleaved_1f1b(3, 6, 2), fwd, bwd, [0.1, 0.2, 0.3, 0.4, 0.5])
    fast = sch.simulate(sch.compiled("interleaved", 3, 6, 2), fwd, bwd, [0.1, 0.2, 0.3, 0.4, 0.5])
    assert plain == fast
    assert len(plain.transfers) == 2 * 6 * 5


# --------------------------------------------------------------------------------------- errors


def parse(*lines: str) -> sch.Schedule:
    return sch.parse_schedule("\n".join(f"{r}: {line}" for r, line in enumerate(lines)))


def test_deadlock_is_detected() -> None:
    s = parse("0F0 0RECV_B0 0SEND_F0 0B0", "1RECV_F0 1F0 1B0 1SEND_B0")
    with pytest.raises(ScheduleError, match=r"deadlock: rank 0 waits at 0RECV_B0; rank 1 waits at 1RECV_F0"):
        sch.simulate(s, [[1.0], [1.0]], [[1.0], [1.0]])


def test_missing_receive_is_reported() -> None:
    s = parse("0F0 0SEND_F0 0RECV_B0 0B0", "1F0 1B0 1SEND_B0")
    with pytest.raises(ScheduleError, match="add 1RECV_F0 before it"):
        sch.simulate(s, [[1.0], [1.0]], [[1.0], [1.0]])


def test_backward_before_forward_is_reported() -> None:
    with pytest.raises(ScheduleError, match="needs 0F0 before it"):
        sch.simulate(parse("0B0 0F0"), [[1.0]], [[1.0]])


def test_send_before_compute_and_unread_messages() -> None:
    with pytest.raises(ScheduleError, match="before computing it"):
        sch.simulate(parse("0SEND_F0 0F0", "1RECV_F0 1F0"), [[1.0], [1.0]], [[1.0], [1.0]])
    with pytest.raises(ScheduleError, match="never received, e.g. add 1RECV_F0"):
        sch.simulate(parse("0F0 0SEND_F0", ""), [[1.0], [1.0]], [[1.0], [1.0]])
    with pytest.raises(ScheduleError, match="listed under rank 0"):
        sch.simulate(parse("1F0"), [[1.0]], [[1.0]])


def test_time_arguments_are_checked() -> None:
    s = sch.one_f_one_b(2, 2)
    with pytest.raises(ValueError, match="2 stages"):
        sch.simulate(s, [[1.0]], [[1.0]])
    with pytest.raises(ValueError, match="transfer times"):
        sch.simulate(s, [[1.0], [1.0]], [[1.0], [1.0]], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-negative"):
        sch.simulate(s, [[1.0], [-1.0]], [[1.0], [1.0]])
    with pytest.raises(ValueError, match="chunks per rank"):
        sch.simulate(sch.compiled("1f1b", 2, 2), [[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]])


def test_peak_in_flight() -> None:
    assert [sch.peak_in_flight(acts) for acts in sch.one_f_one_b(4, 8)] == [4, 3, 2, 1]
    assert [sch.peak_in_flight(acts) for acts in sch.gpipe(4, 8)] == [8] * 4
