"""The per-operator table of `trainplan calibrate` (trainplan.runtime.op_bench): the fit, the probes,
and the aggregation over ranks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainplan.runtime.calibrate import slowest_op_timings
from trainplan.runtime.op_bench import (
    CPU_FP32_FLOP_PROBES,
    ELEMENTWISE_PROBES,
    FLOP_PROBES,
    SIZES,
    OpTiming,
    fit_linear,
    fit_op_costs,
    flop_probes,
    time_probe,
)

UNITS = [1e3, 1.6e4, 1.3e5]


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 1e-3), st.floats(0, 1e-8))
def test_fit_recovers_fixed_and_per_unit(fixed: float, per_unit: float) -> None:
    f, u = fit_linear(UNITS, [fixed + per_unit * n for n in UNITS])
    assert f == pytest.approx(fixed, rel=1e-6, abs=1e-12) and u == pytest.approx(per_unit, rel=1e-6, abs=1e-18)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1e-3), min_size=3, max_size=3))
def test_fit_is_never_negative(seconds: list[float]) -> None:
    f, u = fit_linear(UNITS, seconds)
    assert f >= 0 and u >= 0
    # the constrained fit still passes through the data's scale: no point is off by more than the largest time
    assert all(abs(f + u * n - s) <= max(seconds) + 1e-15 for n, s in zip(UNITS, seconds))


def test_fit_rejects_mismatched_input() -> None:
    with pytest.raises(ValueError):
        fit_linear([1.0, 2.0], [1.0])


@pytest.mark.parametrize("op", sorted(ELEMENTWISE_PROBES) + sorted(FLOP_PROBES) + sorted(CPU_FP32_FLOP_PROBES))
def test_every_probe_runs_forward_and_backward(op: str) -> None:
    flop = flop_probes(torch.device("cpu"), torch.float32)
    per_flop = op in flop
    probe = flop[op] if per_flop else ELEMENTWISE_PROBES[op]
    t = time_probe(op, probe, 1024, torch.device("cpu"), torch.float32, per_flop=per_flop, rounds=1, repeats=1)
    assert t.op == op and t.units > 0 and t.fwd_s >= 0 and t.bwd_s >= 0
    if per_flop:  # counted with torch's flop counter, as the graph front end counts
        assert t.units >= 1024


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("op, kernel", [("conv2d", "aten::mkldnn_convolution"), ("conv2d[native]", "aten::_slow_conv2d_forward")])
def test_each_convolution_probe_times_the_kernel_it_is_named_for(op: str, kernel: str) -> None:
    from torch.profiler import profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in SIZES:
            fn, _ = flop_probes(torch.device("cpu"), torch.float32)[op](n, torch.device("cpu"), torch.float32)
            with profile() as prof:
                fn()
            assert kernel in {e.name for e in prof.events()}, (op, n)
    finally:
        torch.set_num_threads(threads)
    assert "conv2d[native]" not in flop_probes(torch.device("cpu"), torch.bfloat16)
    assert "conv2d[native]" not in flop_probes(torch.device("meta"), torch.float32)


def test_op_costs_per_op_and_kind() -> None:
    timings = [OpTiming("gelu", n, 2e-6 + 1e-9 * n, 5e-6 + 2e-9 * n) for n in UNITS]
    timings += [OpTiming("linear", n, 1e-5 + 1e-12 * n, 3e-5 + 2e-12 * n) for n in UNITS]
    timings += [OpTiming("conv2d[native]", n, 1e-5, 2e-5) for n in UNITS]
    fits = fit_op_costs(timings)
    assert fits["gelu"]["per"] == "element" and fits["linear"]["per"] == "flop" and fits["conv2d[native]"]["per"] == "flop"
    assert fits["gelu"]["bwd_per_unit_s"] == pytest.approx(2e-9) and fits["linear"]["fwd_fixed_s"] == pytest.approx(1e-5)


def test_slowest_rank_per_probe() -> None:
    rank0 = {"fp32": [["add", 10.0, 1.0, 4.0], ["add", 20.0, 2.0, 3.0]]}
    rank1 = {"fp32": [["add", 10.0, 3.0, 1.0], ["add", 20.0, 1.0, 5.0]]}
    out = slowest_op_timings([rank0, rank1])
    assert out["fp32"] == (OpTiming("add", 10.0, 3.0, 4.0), OpTiming("add", 20.0, 2.0, 5.0))
    assert slowest_op_timings([{}, {}]) == {}


@settings(max_examples=50, deadline=None)
@given(st.floats(0.5, 5), st.floats(0.5, 5))
def test_in_situ_factors_solve_both_sizes(a: float, b: float) -> None:
    from trainplan.runtime.op_bench import _solve_factors

    fixed, per_unit = (1e-4, 2e-4), (1e-5, 5e-3)  # small size: fixed costs; large size: work
    measured = tuple(a * f + b * u for f, u in zip(fixed, per_unit))
    got = _solve_factors(fixed, per_unit, measured, 0.5)  # type: ignore[arg-type]
    assert got == pytest.approx((a, b), rel=1e-6)


def test_in_situ_factors_never_fall_below_the_floor() -> None:
    from trainplan.runtime.op_bench import _solve_factors

    a, b = _solve_factors((1e-4, 2e-4), (1e-5, 5e-3), (1e-6, 1e-2), 0.5)  # a tiny small-size time
    assert a == 0.5 and b >= 0.5


def test_in_situ_scales_each_direction_and_the_optimizer() -> None:
    from trainplan.runtime.op_bench import apply_in_situ

    fits = {"gelu": {"per": "element", "fwd_fixed_s": 1.0, "fwd_per_unit_s": 1.0, "bwd_fixed_s": 1.0, "bwd_per_unit_s": 1.0},
            "optimizer:adam": {"per": "element", "fwd_fixed_s": 1.0, "fwd_per_unit_s": 1.0, "bwd_fixed_s": 0.0,
                               "bwd_per_unit_s": 0.0}}
    out = apply_in_situ(fits, {"fwd": (2.0, 3.0), "bwd": (4.0, 5.0), "optimizer": (6.0, 7.0)})
    assert [out["gelu"][k] for k in ("fwd_fixed_s", "fwd_per_unit_s", "bwd_fixed_s", "bwd_per_unit_s")] == [2, 3, 4, 5]
    assert (out["optimizer:adam"]["fwd_fixed_s"], out["optimizer:adam"]["fwd_per_unit_s"]) == (6.0, 7.0)
    assert apply_in_situ(fits, {}) == fits


def test_in_situ_factors_are_measured_for_every_direction() -> None:
    from trainplan.runtime.op_bench import in_situ_factors, in_situ_networks, time_all

    networks = in_situ_networks(torch.device("cpu"), torch.float32, blocks=1)
    fits = fit_op_costs(time_all(torch.device("cpu"), torch.float32, quick=True, networks=networks))
    assert all(0 < t < 1 for n in networks for t in n.best)  # sampled in the probes' rounds
    factors = in_situ_factors(fits, networks)
    assert set(factors) == {"fwd", "bwd", "optimizer"}
    assert all(0.5 <= v < 100 for pair in factors.values() for v in pair)


def test_compute_share_is_the_lockstep_measurement_capped_by_the_cores() -> None:
    from trainplan.runtime.calibrate import compute_share, measured_share

    assert compute_share(2, 4, 1) == 0.5 and compute_share(8, 4, 2) == 1.0
    assert measured_share(0.34, 2, 4, 1, "gloo") == 0.34  # oversubscribed: what lockstep training keeps
    assert measured_share(0.9, 2, 4, 1, "gloo") == 0.5  # never above cores / workers
    assert measured_share(None, 2, 4, 1, "gloo") == 0.5
    assert measured_share(0.7, 4, 2, 1, "gloo") == 0.7  # each worker has its cores, but not the memory alone
    assert measured_share(0.3, 2, 4, 1, "nccl") == 1.0


def test_collective_wait_is_the_lockstep_probes_third_figure_on_gloo_only() -> None:
    from trainplan.runtime.calibrate import collective_wait

    assert collective_wait([0.34, 0.01, 0.004], "gloo") == 0.004
    assert collective_wait([0.34, 0.01, -1e-4], "gloo") == 0.0  # noise below zero: nothing to charge
    assert collective_wait([0.34, 0.01], "gloo") == 0.0  # a probe without it
    assert collective_wait(None, "gloo") == 0.0  # one process: no probe
    assert collective_wait([0.34, 0.01, 0.004], "nccl") == 0.0
