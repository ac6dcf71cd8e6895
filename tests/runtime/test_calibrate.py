"""`trainplan calibrate`: the pure fitting/aggregation functions, the cluster it builds, and real
multi-process runs on gloo (a full quick calibration, a worker that fails, a worker that hangs)."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from trainplan.ir.cluster import Cluster, load_preset
from trainplan.ir.loading import load
from trainplan.runtime.calibrate import (
    BenchPlan,
    CalibrationError,
    Gemm,
    GemmTiming,
    Measurement,
    WorkerContext,
    available_memory_bytes,
    bench_plan,
    bus_bandwidth,
    calibrate,
    calibrate_main,
    copy_bandwidth,
    cluster_from_measurement,
    fit_alpha_beta,
    latency_of,
    native_collective_latency,
    gemm_efficiency,
    link_from_allreduce,
    link_from_p2p,
    peak_flops,
    render_yaml,
    run_local_workers,
    slowest_rank,
    summary_lines,
    threads_per_process,
    transformer_gemms,
    write_atomic,
)

SIZES = [4096 * 4**i for i in range(8)]  # 4 KiB .. 64 MiB


def hockney(alpha: float, beta: float) -> list[float]:
    return [alpha + n / beta for n in SIZES]


def children() -> set[int]:
    """Live child processes of this process (from /proc: the field after the command is the parent)."""
    me, out = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.add(int(stat.parent.name))
    return out


# ---------------------------------------------------------------- pure functions


@settings(max_examples=200, deadline=None)
@given(alpha=st.floats(1e-7, 1e-2), beta=st.floats(1e6, 1e12))
def test_fit_recovers_exact_alpha_beta(alpha: float, beta: float) -> None:
    a, b = fit_alpha_beta(SIZES, hockney(alpha, beta))
    assert a == pytest.approx(alpha, rel=1e-6)
    assert b == pytest.approx(beta, rel=1e-6)


def test_fit_recovers_alpha_beta_through_noise() -> None:
    rng = random.Random(0)
    alpha, beta = 50e-6, 2.5e9
    sizes = SIZES * 5
    times = [(alpha + n / beta) * (1 + rng.gauss(0, 0.02)) for n in sizes]
    a, b = fit_alpha_beta(sizes, times)
    assert a == pytest.approx(alpha, rel=0.05)
    assert b == pytest.approx(beta, rel=0.05)


def test_fit_weights_small_messages_for_latency() -> None:
    # An unweighted fit would let one 1 % error at 64 MiB (270 us here) swamp a 20 us latency.
    times = hockney(20e-6, 1e9)
    times[-1] *= 1.01
    a, _ = fit_alpha_beta(SIZES, times)
    assert a == pytest.approx(20e-6, rel=0.1)


def test_fit_rejects_what_it_cannot_fit() -> None:
    with pytest.raises(ValueError, match="two distinct"):
        fit_alpha_beta([4096, 4096], [1e-5, 2e-5])
    with pytest.raises(ValueError, match="does not grow"):
        fit_alpha_beta([4096, 65536], [2e-5, 1e-5])
    with pytest.raises(ValueError, match="positive"):
        fit_alpha_beta([4096, 65536], [0.0, 1e-5])


def test_bus_bandwidth_follows_nccl_tests() -> None:
    assert bus_bandwidth(1e9, 1.0, 2) == pytest.approx(1e9)  # 2(n-1)/n = 1 for two ranks
    assert bus_bandwidth(1e9, 0.5, 8) == pytest.approx(2e9 * 1.75)
    with pytest.raises(ValueError):
        bus_bandwidth(1e9, 1.0, 1)


@pytest.mark.parametrize(("cores", "nproc", "threads"), [(2, 2, 1), (16, 2, 8), (2, 4, 1), (1, 1, 1), (8, 3, 2)])
def test_threads_share_the_cores(cores: int, nproc: int, threads: int) -> None:
    assert threads_per_process(cores, nproc) == threads


def test_gemm_flops_and_transformer_shapes() -> None:
    up, down = transformer_gemms(2048, 768)
    assert (up.m, up.k, up.n) == (2048, 768, 3072) and (down.m, down.k, down.n) == (2048, 3072, 768)
    assert up.flops == down.flops == 2 * 2048 * 768 * 3072


def test_backward_transformer_shapes_are_a_linear_layers_three_products() -> None:
    products = transformer_gemms(256, 128, backward=True)
    assert [g.layout for g in products] == ["nt", "nn", "tn"] * 2
    forward, dx, dw = products[:3]
    assert (forward.m, forward.k, forward.n) == (256, 128, 512)
    assert (dx.m, dx.k, dx.n) == (256, 512, 128)  # dy (tokens, 4h) @ W (4h, h)
    assert (dw.m, dw.k, dw.n) == (512, 256, 128)  # dy^T (4h, tokens) @ x (tokens, h)
    assert forward.flops == dx.flops == dw.flops


def test_copy_bandwidth_counts_read_and_write() -> None:
    assert copy_bandwidth(2**30, 0.5) == pytest.approx(2 * 2**30 / 0.5)
    with pytest.raises(ValueError):
        copy_bandwidth(2**30, 0.0)


def test_algorithm_timings_are_listed_per_size_in_the_header() -> None:
    m = dataclasses.replace(measurement(), algorithms=(("ring", 4096, 1e-4), ("tree", 4096, 5e-5),
                                                       ("ring", 65536, 2e-4), ("tree", 65536, 3e-4)))
    lines = summary_lines(m)
    start = next(i for i, line in enumerate(lines) if line.startswith("trainplan's all-reduce algorithms"))
    assert "ring" in lines[start + 1] and "tree" in lines[start + 1]
    assert "100.0 us" in lines[start + 2] and "50.0 us" in lines[start + 2] and "300.0 us" in lines[start + 3]


def test_measured_bandwidth_and_kernel_cost_replace_the_presets_guesses() -> None:
    m = dataclasses.replace(measurement(), memory_bandwidth=12.5e9, kernel_launch=7.5e-6)
    c = cluster_from_measurement(m, base="cpu-local")
    assert c.device.memory_bandwidth == pytest.approx(12.5e9) and c.device.kernel_launch == pytest.approx(7.5e-6)
    text = render_yaml(c, m)
    assert "memory_bandwidth: copy" in text and "kernel_launch: a chain" in text
    unmeasured = cluster_from_measurement(measurement(), base="cpu-local")
    assert unmeasured.device.memory_bandwidth == load_preset("cpu-local").device.memory_bandwidth


def timing(dtype: str, family: str, size: int, gflops: float) -> GemmTiming:
    g = Gemm(size, size, size, family)
    return GemmTiming(dtype, g, g.flops / (gflops * 1e9))


def test_peak_is_best_and_efficiency_is_transformer_median_over_best() -> None:
    ts = [timing("fp32", "square", 256, 50), timing("fp32", "square", 1024, 100),
          timing("fp32", "transformer", 512, 60), timing("fp32", "transformer", 768, 70),
          timing("fp32", "transformer", 1024, 90), timing("bf16", "square", 512, 30)]
    peaks = peak_flops(ts)
    assert peaks == pytest.approx({"fp32": 100e9, "bf16": 30e9})
    assert gemm_efficiency(ts, "fp32") == pytest.approx(0.7)
    with pytest.raises(ValueError, match="transformer-shaped bf16"):
        gemm_efficiency(ts, "bf16")


def test_slowest_rank_sets_the_pace() -> None:
    fast, slow = timing("fp32", "square", 512, 100), timing("fp32", "square", 512, 40)
    other = timing("bf16", "square", 512, 20)
    merged = slowest_rank([[fast, other], [slow]])
    assert sorted(merged, key=lambda t: t.dtype) == [other, slow]


def test_bench_plan_sizes_and_json_round_trip() -> None:
    full, quick = bench_plan(quick=False, cuda=False), bench_plan(quick=True, cuda=False)
    assert full.comm_sizes[0] == 4 * 2**10 and full.comm_sizes[-1] == 64 * 2**20
    assert len(quick.comm_sizes) < len(full.comm_sizes) and quick.repeats < full.repeats
    assert {g.family for g in quick.gemms} == {"square", "transformer"}
    for plan in (full, quick, bench_plan(quick=False, cuda=True)):
        assert BenchPlan.from_json(plan.to_json()) == plan


def test_available_memory_is_plausible() -> None:
    assert 64 * 2**20 < available_memory_bytes() < 2**50


# ---------------------------------------------------------------- cluster building and writing


def measurement(nproc: int = 2, p2p: bool = True) -> Measurement:
    ts = (timing("fp32", "square", 512, 80), timing("fp32", "transformer", 1024, 60))
    pp = tuple((n, t) for n, t in zip(SIZES, hockney(40e-6, 3e9))) if p2p else ()
    ar = tuple((n, 2 * t) for n, t in pp)
    return Measurement(backend="gloo", nproc=nproc, threads=1, quick=True, device_name="test CPU",
                       memory=8 * 2**30, memory_reserved=300 * 2**20, gemms=ts, p2p=pp, allreduce=ar,
                       started_utc="2026-01-01T00:00:00+00:00", wall_s=1.0)


def test_cluster_from_measurement_uses_only_measured_numbers() -> None:
    c = cluster_from_measurement(measurement(), base="cpu-local")
    assert c.devices_per_node == 2 and c.nodes == 1 and c.backend == "gloo" and c.preset == "cpu-local"
    assert c.device.peak_flops == pytest.approx({"fp32": 80e9})  # no bf16/fp16 guesses kept from the preset
    assert c.device.efficiency == pytest.approx(0.75)
    assert c.device.memory == 8 * 2**30 and c.device.memory_reserved == 300 * 2**20
    # the helper's all-reduce takes 2x the ping-pong: 2*40 us + 2 S / 3 GB/s = ring(n=2) with alpha 40 us, beta 1.5 GB/s
    assert c.intra_node.bandwidth == pytest.approx(1.5e9, rel=1e-3)
    assert c.intra_node.latency == pytest.approx(40e-6, rel=1e-3)
    assert c.inter_node == c.intra_node


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_the_link_reproduces_the_measured_all_reduce_in_the_cost_models_ring(n: int) -> None:
    alpha, beta = 300e-6, 0.8e9
    measured = [(s, 2 * (n - 1) * alpha + 2 * (n - 1) / n * s / beta) for s in SIZES]
    link = link_from_allreduce(measured, n)
    assert link["latency"] == pytest.approx(alpha, rel=1e-3) and link["bandwidth"] == pytest.approx(beta, rel=1e-3)
    with pytest.raises(ValueError):
        link_from_allreduce(measured, 1)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_native_collective_latency_is_the_rings_per_step_latency(n: int) -> None:
    alpha, beta = 1.2e-3, 0.9e9  # gloo's reduce-scatter here: about a whole all-reduce's latency
    measured = [(s, (n - 1) * alpha + (n - 1) / n * s / beta) for s in SIZES]
    assert native_collective_latency(measured, n) == pytest.approx(alpha, rel=1e-3)
    flat = [(s, 3e-3) for s in SIZES[:4]]  # latency-bound over the whole range: the fastest time bounds it
    assert native_collective_latency(flat, n) == pytest.approx(3e-3 / (n - 1), rel=1e-3)
    with pytest.raises(ValueError):
        native_collective_latency(measured, 1)


def test_calibrated_links_carry_fsdps_collectives_as_a_step_pays_them() -> None:
    """Alone, the all-gather / reduce-scatter timings give the link per-collective latencies; where the
    FSDP2 probe ran, the latencies reproduce its in-step all-gather and reduce-scatter of a unit in the
    planner's ring model instead, and its hooks become ``fsdp_unit_overhead`` at full speed (x share)."""
    from trainplan.planner.cost import comm

    n, alpha_ag, alpha_rs, beta = 4, 0.5e-3, 1.5e-3, 1e9
    ag = tuple((s, (n - 1) * alpha_ag + (n - 1) / n * s / beta) for s in SIZES)
    rs = tuple((s, (n - 1) * alpha_rs + (n - 1) / n * s / beta) for s in SIZES)
    alone = dataclasses.replace(measurement(nproc=n), all_gather=ag, reduce_scatter=rs, compute_share=0.4,
                                allreduce=tuple((s, 2 * (n - 1) * 0.7e-3 + 2 * (n - 1) / n * s / beta) for s in SIZES))
    c = cluster_from_measurement(alone, base="cpu-local")
    assert c.intra_node.all_gather_latency == pytest.approx(alpha_ag, rel=1e-3)
    assert c.intra_node.reduce_scatter_latency == pytest.approx(alpha_rs, rel=1e-3)
    assert c.intra_node.latency == pytest.approx(0.7e-3, rel=1e-3) and c.inter_node == c.intra_node
    assert c.device.fsdp_unit_overhead == 0.0  # not measured: the presets' 0

    unit = {"gather_s": 4.6e-3, "scatter_s": 7.4e-3, "hooks_s": 1e-3, "unit_bytes": 66816.0}
    c = cluster_from_measurement(dataclasses.replace(alone, fsdp_unit=unit), base="cpu-local")
    link = comm.group_link(c, n, 1)
    assert comm.all_gather_time_s(unit["unit_bytes"], n, link) == pytest.approx(unit["gather_s"], rel=1e-3)
    assert comm.reduce_scatter_time_s(unit["unit_bytes"], n, link) == pytest.approx(unit["scatter_s"], rel=1e-3)
    assert c.inter_node == c.intra_node and c.intra_node.latency == pytest.approx(0.7e-3, rel=1e-3)
    assert c.device.fsdp_unit_overhead == pytest.approx(1e-3 * 0.4, rel=1e-3)
    assert latency_of(1e-6, unit["unit_bytes"], n, beta) == 0.0  # faster than the bytes alone: no latency
    with pytest.raises(ValueError):
        latency_of(1e-3, 1.0, 1, beta)


def test_single_process_takes_links_from_the_base_or_says_how() -> None:
    with pytest.raises(CalibrationError, match="--nproc 2 or more, or pass --base"):
        cluster_from_measurement(measurement(nproc=1, p2p=False), base=None)
    c = cluster_from_measurement(measurement(nproc=1, p2p=False), base="cpu-local")
    assert c.intra_node == load_preset("cpu-local").intra_node
    with pytest.raises(CalibrationError, match="unknown preset"):
        cluster_from_measurement(measurement(), base="no-such-preset")


def test_non_positive_fitted_latency_falls_back_to_the_fastest_message() -> None:
    times = hockney(-1e-6, 1e9)  # the line crosses zero: latency is below what the data resolve
    link = link_from_p2p(list(zip(SIZES, times)))
    assert link["latency"] == pytest.approx(min(times), rel=1e-3)
    with pytest.raises(CalibrationError, match="cannot fit"):
        link_from_p2p([(4096, 2e-5), (65536, 1e-5)])


def test_yaml_reads_back_with_header_and_one_host_note(tmp_path: Path) -> None:
    m = measurement()
    c = cluster_from_measurement(m, base="cpu-local")
    text = render_yaml(c, m)
    assert text.startswith("# Measured by `trainplan calibrate`")
    assert "inter_node repeats intra_node" in text and "busbw" in text
    out = tmp_path / "c.yaml"
    out.write_text("old")
    write_atomic(out, text)
    assert load(Cluster, out) == c
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]  # the temporary file was renamed away


# ---------------------------------------------------------------- real processes


def failing_worker(ctx: WorkerContext) -> dict:
    if ctx.rank == 1:
        raise ValueError("deliberate failure in rank 1")
    dist.all_reduce(torch.ones(4))  # rank 0 waits on the dead peer: must not hang
    return {}


def sleeping_worker(ctx: WorkerContext) -> dict:
    time.sleep(600)
    return {}


@pytest.fixture
def importable_tests(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Let worker processes import this test module as ``tests.runtime.test_calibrate``."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))


@pytest.mark.slow
def test_worker_failure_is_a_clear_error_and_leaves_no_process(importable_tests: None) -> None:
    before, start = children(), time.monotonic()
    with pytest.raises(CalibrationError, match=r"^calibration failed: worker rank 1 exited with code 1: ValueError: deliberate failure in rank 1"):
        run_local_workers("tests.runtime.test_calibrate:failing_worker", 2, backend="gloo", config={},
                          threads=1, timeout_s=120)
    assert time.monotonic() - start < 60
    assert children() <= before


@pytest.mark.slow
def test_hanging_worker_is_killed_at_the_deadline(importable_tests: None) -> None:
    before = children()
    with pytest.raises(CalibrationError, match="did not finish within 3 s and were killed"):
        run_local_workers("tests.runtime.test_calibrate:sleeping_worker", 2, backend="gloo", config={},
                          threads=1, timeout_s=3)
    assert children() <= before


@pytest.mark.slow
def test_quick_calibration_writes_a_plausible_cluster(tmp_path: Path) -> None:
    before, out = children(), tmp_path / "c.yaml"
    returned = calibrate(out, nproc=2, quick=True)
    c = load(Cluster, out)
    assert c == returned
    assert c.backend == "gloo" and c.devices_per_node == 2 and c.inter_node == c.intra_node
    assert set(c.device.peak_flops) >= {"fp32"} and all(f > 0 for f in c.device.peak_flops.values())
    assert 0 < c.device.efficiency <= 1
    assert 0 < c.device.memory_reserved < c.device.memory
    assert 1e6 < c.intra_node.bandwidth < 1e12
    assert 1e-9 < c.intra_node.latency < 1.0
    assert 1e8 < c.device.memory_bandwidth < 1e13 and 1e-8 < c.device.kernel_launch < 1e-2
    assert 0 < c.device.compute_share <= 1
    assert 0 <= c.device.collective_wait_s < 1.0  # what a blocking collective adds in a step, measured
    assert 0 <= c.device.fsdp_unit_overhead < 1.0  # FSDP2's own time per unit and micro-batch, measured
    assert "fsdp_unit_overhead" in out.read_text()
    tp = c.device.tp_overhead  # DTensor's own time under tensor parallelism, measured over the pair
    assert 1e-6 < tp.module_fwd_s + tp.module_bwd_s < 0.1 and 0 <= tp.loss_fwd_s + tp.loss_bwd_s < 0.1
    assert set(tp.param_step_s) == {"sgd", "adam", "adamw"} and 0 < tp.param_step_s["adam"] < 0.01
    full, selective = c.device.op_costs["fp32"]["recompute:full"], c.device.op_costs["fp32"]["recompute:selective"]
    assert 0 < full.fwd_fixed_s + full.bwd_fixed_s < 1e-3 and 0 < selective.fwd_fixed_s + selective.bwd_fixed_s < 1e-3
    ops = c.device.op_costs["fp32"]  # the per-operator table the cost model sums over a traced graph
    assert {"linear", "gelu", "layer_norm", "add", "view", "scaled_dot_product_attention"} <= set(ops)
    assert ops["linear"].per == "flop" and ops["gelu"].per == "element"
    assert all(v >= 0 for c_ in ops.values() for v in (c_.fwd_fixed_s, c_.fwd_per_unit_s, c_.bwd_fixed_s, c_.bwd_per_unit_s))
    assert 0 < ops["linear"].fwd_fixed_s + ops["linear"].fwd_per_unit_s * 1e6 < 1e-2  # a 1 MFLOP product: under 10 ms
    header = out.read_text()
    assert "op_costs fp32:" in header
    assert "trainplan's all-reduce algorithms" in header and "ring" in header and "tree" in header
    assert c.device.pace_reference_s is not None and 0 < c.device.pace_reference_s < 1
    # `--refresh`: the lockstep probe again, and the measured costs at its pace
    assert calibrate_main(["--refresh", str(out), "-o", str(tmp_path / "now.yaml"), "--quick"]) == 0
    now = load(Cluster, tmp_path / "now.yaml")
    pace = now.device.pace_reference_s / c.device.pace_reference_s
    assert 0.2 < pace < 5 and 0 < now.device.compute_share <= 1 and 0 <= now.device.collective_wait_s < 1.0
    assert now.device.op_costs["fp32"]["linear"].fwd_fixed_s == pytest.approx(ops["linear"].fwd_fixed_s * pace, rel=1e-3)
    assert now.intra_node == c.intra_node
    assert children() <= before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "now.yaml"]


@pytest.mark.slow
def test_cli_single_process_prints_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert calibrate_main(["--nproc", "1", "--quick"]) == 0
    text = capsys.readouterr().out
    c = Cluster.model_validate(yaml.safe_load(text))
    assert c.devices_per_node == 1 and c.intra_node == load_preset("cpu-local").intra_node
    assert "Not measured (one process)" in text


def test_cli_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        calibrate_main(["--nproc", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(CalibrationError, match="--backend nccl needs CUDA"):
            calibrate_main(["--backend", "nccl", "--quick"])


def test_the_recompute_probe_recomputes_what_the_planner_says_selective_recomputes() -> None:
    from trainplan.planner.model_costs import SELECTIVE_SAVED_OPS
    from trainplan.runtime.calibrate_framework import SELECTIVE_RECOMPUTED
    from trainplan.runtime.op_bench import _synthetic_ops

    names = {op for op, _, _ in _synthetic_ops(8, 8)} - {"module_call"}
    assert {op for op in names if op not in SELECTIVE_SAVED_OPS} == SELECTIVE_RECOMPUTED


def test_the_recompute_probe_counts_saved_tensors_as_the_planner_does() -> None:
    """The probe divides the machinery's time by SYNTHETIC_SAVED_TENSORS per block; the planner
    multiplies by the count of the traced block (``saved_tensor_count``): they must be one count."""
    from trainplan.ir.spec import TaskSpec
    from trainplan.models.registry import BuiltModel
    from trainplan.passes import build_graph
    from trainplan.planner.model_costs import saved_tensor_count
    from trainplan.runtime.calibrate_framework import SYNTHETIC_SAVED_TENSORS
    from trainplan.runtime.op_bench import _SyntheticBlock

    class Network(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([_SyntheticBlock(8) for _ in range(2)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x.mean(-1)

    with torch.device("meta"):
        net = Network()
    graph = build_graph(BuiltModel(net, TaskSpec(kind="classification", input_shape=[4, 8], classes=4), None))
    blocks = [u for u in graph.units if u.kind == "block"]
    assert len(blocks) == 2
    assert [saved_tensor_count(graph.unit_nodes(u)) for u in blocks] == [SYNTHETIC_SAVED_TENSORS] * 2


@pytest.mark.parametrize("slowdown", [1.0, 1.8])
def test_the_recompute_probe_reports_at_the_tables_pace(monkeypatch: pytest.MonkeyPatch, slowdown: float) -> None:
    """The checkpointing overhead comes out in the operator table's seconds however fast the machine
    runs while it is probed: network times are scaled by the table's prediction of the plain network
    over its measured time in the same round (here every time of the probe is ``slowdown`` x)."""
    from trainplan.runtime import op_bench
    from trainplan.runtime.calibrate_framework import (
        RECOMPUTE_BLOCKS,
        SELECTIVE_RECOMPUTED,
        SYNTHETIC_SAVED_TENSORS,
        recompute_overhead,
    )

    saved = SYNTHETIC_SAVED_TENSORS * RECOMPUTE_BLOCKS
    tokens, width = op_bench.IN_SITU_SIZES[0]
    table = {name: {"fwd_fixed_s": 2e-5, "fwd_per_unit_s": 1e-9, "bwd_fixed_s": 3e-5, "bwd_per_unit_s": 2e-9}
             for name, _, _ in op_bench._synthetic_ops(tokens, width)}
    network = op_bench._synthetic_ops(tokens, width) * RECOMPUTE_BLOCKS
    plain = [sum(op_bench._predicted(table, network, d)) for d in ("fwd", "bwd")]
    ops = [op for op in network if op[0] != "module_call"]
    redo = {"full": ops, "selective": [op for op in ops if op[0] in SELECTIVE_RECOMPUTED]}
    machinery = {"full": (10e-6, 20e-6), "selective": (40e-6, 50e-6)}  # per saved tensor, table seconds
    order = iter(["none", "full", "selective"] * 10)  # each round times the three modes in this order

    def fake_phases(model, x, device, *, rounds, repeats):  # noqa: ANN001, ANN202
        mode = next(order)
        if mode == "none":
            return [slowdown * plain[0], slowdown * plain[1]]
        f, b = machinery[mode]
        again = sum(op_bench._predicted(table, redo[mode], "fwd"))
        return [slowdown * (plain[0] + saved * f), slowdown * (plain[1] + again + saved * b)]

    monkeypatch.setattr(op_bench, "network_phases", fake_phases)
    got = recompute_overhead(table, torch.device("cpu"), torch.float32, rounds=3, repeats=1)
    for mode, (f, b) in machinery.items():
        assert got[mode] == pytest.approx([f, b], rel=1e-9)
