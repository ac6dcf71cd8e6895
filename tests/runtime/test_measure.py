"""Measured memory next to the planner's estimate (``summary.json``'s ``memory`` section).

The model-state estimates (parameters, gradients, optimizer state) must equal what each rank
holds, byte for byte, for every layout here: plans made by the planner with the layout fixed,
run on 4 gloo processes. ZeRO-1's partition (``ZeroRedundancyOptimizer`` assigns whole
parameters to ranks) differs per rank by less than one parameter's state; the sum over the
data-parallel ranks is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.runtime.plans import gpt_spec
from trainplan.api import plan, spec_from_dict
from trainplan.ir.plan import Plan
from trainplan.runtime.launch import launch_sweep
from trainplan.runtime.measure import SavedTensorTracker, unique_bytes, warnings_for

FIXED = {"tp": 1, "pp": 1, "micro_batch": 1, "schedule": "1f1b", "virtual_stages": 1, "recompute": "none",
         "sequence_parallel": False, "allreduce": "native", "sync": "sync", "compression": "none"}
LAYOUTS = {
    "dp4-zero0": {"dp": 4, "zero": 0},
    "dp4-zero1": {"dp": 4, "zero": 1},
    "dp4-zero2": {"dp": 4, "zero": 2},
    "dp4-zero3": {"dp": 4, "zero": 3},
    "tp2-dp2": {"dp": 2, "tp": 2, "zero": 0},
    "pp2-dp2-1f1b": {"dp": 2, "pp": 2, "zero": 0},
    "tp2-pp2": {"dp": 1, "tp": 2, "pp": 2, "zero": 0, "micro_batch": 2},
}


def planned(layout: dict[str, object], **spec: object) -> Plan:
    """The planner's plan of the tiny GPT with every parallel field fixed: real estimates."""
    data = gpt_spec(4, steps=2, **spec)
    data["parallel"] = {**FIXED, **layout}
    return plan(spec_from_dict(data))[0]


@pytest.mark.slow
def test_model_state_estimates_are_exact(tmp_path: Path) -> None:
    plans = {name: planned(layout) for name, layout in LAYOUTS.items()}
    outs = [tmp_path / name for name in plans]
    code = launch_sweep(list(plans.values()), nproc=4, out_dirs=outs, run_dir=tmp_path / "run")
    assert code == 0, (tmp_path / "run" / "error.txt").read_text()
    for (name, p), out in zip(plans.items(), outs):
        summary = json.loads((out / "summary.json").read_text())
        memory = summary["memory"]
        assert len(memory["ranks"]) == 4
        # the same runs' time section: each rank's phases next to the plan's estimates
        for row in summary["time"]["ranks"]:
            phases = row["phases"]
            assert phases["forward"]["measured"] > 0 and phases["backward"]["measured"] > 0, (name, row)
            update = p.estimate.update_time_s + p.estimate.comm_time_s.dp_in_update
            assert update > 0 and phases["update"]["estimated"] == pytest.approx(update), (name, row)
            # the update phase is the optimizer step plus the per-step all-gather after it
            assert phases["update"]["measured"] >= phases["optimizer"]["measured"] > 0, (name, row)
        for row in memory["ranks"]:
            c = row["components"]
            assert c["activations"]["measured"] > 0, (name, row)
            for part in ("params", "grads", "optimizer"):
                measured, estimated = c[part]["measured"], c[part]["estimated"]
                if name == "tp2-pp2" and part == "grads" and row["stage"] == 0:
                    # Known runtime excess, not an estimate error: the vocabulary-parallel embedding's
                    # gradient comes back replicated (whole) on a stage without the tied LM head and
                    # is cut to this rank's rows only in the tied-gradient sum (pipeline.TiedSync).
                    vocab, hidden = p.spec.model.args["vocab"], p.spec.model.args["hidden"]
                    assert measured == estimated + vocab * hidden * 4 // 2, (name, row)
                elif name == "dp4-zero1" and part == "optimizer":
                    largest = max(q.numel() for q in _meta_params(p)) * 8  # Adam: two fp32 moments
                    assert abs(measured - estimated) < largest, (name, row)
                else:
                    assert measured == estimated, f"{name} rank {row['rank']}: {part} {measured} != {estimated}"
        if name == "dp4-zero1":
            total = sum(r["components"]["optimizer"]["measured"] for r in memory["ranks"])
            assert total == 4 * memory["ranks"][0]["components"]["optimizer"]["estimated"]
        # no model-state warning; the summary names each rank's stage
        assert not [w for w in memory["warnings"] if any(k in w for k in ("params", "grads", "optimizer"))]
        assert {row["stage"] for row in memory["ranks"]} == set(range(p.mesh.pp))


def _meta_params(p: Plan) -> list[torch.nn.Parameter]:
    from trainplan.models import build_model

    return list(build_model(p.spec.model, p.spec.task, device="meta").module.parameters())


def test_saved_tensor_tracker_counts_unique_storages_and_skips_parameters() -> None:
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    tracker = SavedTensorTracker()
    with tracker.track():
        h = x @ w  # saves x and w (w excluded: a parameter)
        y = (h * h).sum()  # saves h twice: one storage
    assert tracker.peak == unique_bytes([x, h]) == (4 * 8 + 4 * 8) * 4
    y.backward()
    assert tracker.live == 0


def test_warning_names_component_and_rank() -> None:
    p = planned({"dp": 4, "zero": 0})
    row = {"rank": 3, "stage": 0, "components": {
        "activations": {"measured": 120.0, "estimated": 100.0, "rel_error": 0.2},
        "params": {"measured": 105.0, "estimated": 100.0, "rel_error": 0.05},
    }}
    lines = warnings_for(p, [row])
    assert len(lines) == 1 and "rank 3" in lines[0] and "activations" in lines[0] and "20%" in lines[0]


def test_saved_tensor_tracker_frees_a_graph_never_backpropagated() -> None:
    # sigmoid saves its own output: a pack result holding that tensor (and so its grad_fn) would form
    # a reference cycle through C++ autograd nodes that no garbage collection frees, and the graph's
    # saved bytes would stay counted for ever (PipelineStage's shape inference leaves such a graph).
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    tracker = SavedTensorTracker()
    with tracker.track():
        y = torch.tanh(torch.sigmoid(lin(x)))
    assert tracker.live == 3 * 4 * 8 * 4  # x, sigmoid's output, tanh's output
    del y
    assert tracker.live == 0


def test_saved_tensor_tracker_keeps_gradients() -> None:
    # the pack result holds a detached tensor; autograd must still compute the same gradients from it
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    expected = torch.autograd.grad(torch.tanh(torch.sigmoid(lin(x))).pow(2).sum(), [x, lin.weight])
    tracker = SavedTensorTracker()
    with tracker.track():
        out = torch.tanh(torch.sigmoid(lin(x))).pow(2).sum()
    got = torch.autograd.grad(out, [x, lin.weight])
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert tracker.live == 0


@pytest.mark.slow
def test_pipeline_activations_match_the_estimate_on_every_stage(tmp_path: Path) -> None:
    # Regression: the first stage measured ~0.7 of a micro-batch more than the estimate (+35% under
    # 1F1B, +17% under GPipe at pp=2, m=4) because shape inference's forward graph stayed counted.
    plans = {name: planned({"dp": 2, "pp": 2, "zero": 0, "schedule": schedule})
             for name, schedule in (("1f1b", "1f1b"), ("gpipe", "gpipe"))}
    outs = [tmp_path / name for name in plans]
    code = launch_sweep(list(plans.values()), nproc=4, out_dirs=outs, run_dir=tmp_path / "run")
    assert code == 0, (tmp_path / "run" / "error.txt").read_text()
    for name, out in zip(plans, outs):
        memory = json.loads((out / "summary.json").read_text())["memory"]
        assert {row["stage"] for row in memory["ranks"]} == {0, 1}
        for row in memory["ranks"]:
            c = row["components"]["activations"]
            assert abs(c["rel_error"]) <= 0.05, f"{name} rank {row['rank']} (stage {row['stage']}): {c}"
        assert not [w for w in memory["warnings"] if "activations" in w], memory["warnings"]


def test_saved_data_slices_count_their_rows_not_the_whole_batch() -> None:
    """A micro-batch is a view of the replica's batch (held by the trainer): a convolution saving it
    adds its own rows, and two micro-batches in flight are two slices."""
    from trainplan.runtime.measure import SavedTensorTracker

    batch = torch.randn(8, 3, 4, 4)
    weight = torch.nn.Parameter(torch.randn(2, 3, 3, 3))
    tracker = SavedTensorTracker()
    with tracker.track():
        outs = [torch.nn.functional.conv2d(batch[i:i + 2], weight) for i in (0, 2)]
    rows = 2 * 3 * 4 * 4 * 4  # bytes of one 2-sample slice
    assert tracker.peak == 2 * rows  # the two slices (conv2d also saves its weight: a parameter, not counted)
    del outs
    assert tracker.live == 0


def test_time_phases_split_each_step_and_meet_their_estimates() -> None:
    """Medians over the steps of each phase: the backward of an unpipelined step is the micro-batch
    phase less the forward; the exposed sync is the last micro-batch's backward less the mean of the
    others; the update is the step less its micro-batches (the optimizer and the all-gather)."""
    from trainplan.runtime.measure import StepTimes, _median_times, time_comparison

    steps = [StepTimes(forward=0.010 * k, micro=0.050 * k, optimizer=0.004 * k, step=0.060 * k,
                       backward_per_micro=[0.010 * k, 0.020 * k]) for k in (1, 2, 3)]
    times = _median_times(steps, pipelined=False, m=2)
    assert times["forward"] == pytest.approx(0.020) and times["backward"] == pytest.approx(0.080)
    assert times["dp_sync"] == pytest.approx(0.020) and times["optimizer"] == pytest.approx(0.008)
    assert times["update"] == pytest.approx(0.020) and times["bubble"] is None
    assert _median_times([StepTimes(micro=0.05)], pipelined=False, m=1)["update"] is None  # step not timed
    p = planned({"dp": 4, "zero": 0})
    row = time_comparison(p, {"rank": 0, "pp": 0, "time": times})
    update = row["phases"]["update"]
    assert update["estimated"] == p.estimate.update_time_s > 0
    assert update["rel_error"] == pytest.approx(0.020 / p.estimate.update_time_s - 1)
    forward = row["phases"]["forward"]
    assert forward["estimated"] == pytest.approx(p.num_microbatches * p.stages[0].fwd_time_s)
    # the backward phase spans the last micro-batch's gradient sync: its estimate holds the exposed sync
    assert p.estimate.comm_time_s.dp > 0
    assert row["phases"]["backward"]["estimated"] == pytest.approx(
        p.num_microbatches * p.stages[0].bwd_time_s + p.estimate.comm_time_s.dp)
    # in a pipeline FSDP2 reduces after the schedule, in what the bubble measures; DDP in the backward
    for zero, in_backward in ((1, True), (2, False)):
        q = planned({"dp": 2, "pp": 2, "zero": zero})
        pipelined = {**times, "bubble": 0.010, "dp_sync": None}
        phases = time_comparison(q, {"rank": 0, "pp": 0, "time": pipelined})["phases"]
        chunks = [s for s in q.stages if 0 in s.ranks]
        bwd = q.num_microbatches * sum(c.bwd_time_s for c in chunks)
        bubble = q.estimate.bubble_fraction * q.estimate.step_time_s
        c = q.estimate.comm_time_s
        sync = c.dp - c.dp_in_forward - c.dp_in_backward - c.dp_in_update
        assert sync > 0
        assert phases["backward"]["estimated"] == pytest.approx(bwd + c.dp_in_backward + (sync if in_backward else 0.0))
        assert phases["bubble"]["estimated"] == pytest.approx(bubble + (0.0 if in_backward else sync))
        assert phases["update"]["estimated"] == pytest.approx(q.estimate.update_time_s + c.dp_in_update)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_each_part_of_the_exposed_dp_time_goes_to_the_phase_that_holds_it(zero: int) -> None:
    """FSDP2 all-gathers the parameters before each forward (ZeRO-2/3) and again before each
    backward (ZeRO-3), ZeRO-1 broadcasts the updated parameters inside the optimizer step, and the
    gradient sync proper runs in the last micro-batch's backward: each phase's estimate holds its part."""
    from trainplan.runtime.measure import time_comparison

    p = planned({"dp": 4, "zero": zero})
    c = p.estimate.comm_time_s
    m = p.num_microbatches
    assert c.dp > 0
    assert (c.dp_in_forward > 0) == (zero in (2, 3))
    assert (c.dp_in_backward > 0) == (zero == 3)
    assert (c.dp_in_update > 0) == (zero == 1)
    if zero == 3:  # two gathers per micro-batch, one before each pass; the per-unit work split evenly
        assert c.dp_in_backward == pytest.approx(c.dp_in_forward)
    sync = c.dp - c.dp_in_forward - c.dp_in_backward - c.dp_in_update
    assert sync > 0  # the reduce-scatter or all-reduce
    times = {"forward": 0.01, "backward": 0.02, "dp_sync": 0.005, "bubble": None, "optimizer": 0.004, "update": 0.006}
    phases = time_comparison(p, {"rank": 0, "pp": 0, "time": times})["phases"]
    assert phases["forward"]["estimated"] == pytest.approx(m * p.stages[0].fwd_time_s + c.dp_in_forward)
    assert phases["backward"]["estimated"] == pytest.approx(m * p.stages[0].bwd_time_s + c.dp_in_backward + sync)
    assert phases["dp_sync"]["estimated"] == pytest.approx(sync)
    assert phases["update"]["estimated"] == pytest.approx(p.estimate.update_time_s + c.dp_in_update)
    # the parts add up to the step: nothing counted twice or lost
    total = sum(phases[k]["estimated"] for k in ("forward", "backward", "update"))
    assert total == pytest.approx(p.estimate.step_time_s)