"""`trainplan calibrate --refresh` (trainplan.runtime.calibrate_refresh): a calibration brought to the
machine's current speed. The real probe runs in tests/runtime/test_calibrate.py's quick calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from trainplan.api import plan, spec_from_dict
from trainplan.ir.cluster import Cluster, preset_dict
from trainplan.runtime.calibrate import CalibrationError, calibrate_main
from trainplan.runtime.calibrate_refresh import refreshed, render_refreshed


def calibrated(share: float = 0.4, reference: float = 0.01, wait: float = 0.0) -> Cluster:
    """cpu-local with a small measured operator table, as `trainplan calibrate` writes one."""
    data = preset_dict("cpu-local")
    cost = {"per": "element", "fwd_fixed_s": 4e-6, "fwd_per_unit_s": 1e-9, "bwd_fixed_s": 8e-6, "bwd_per_unit_s": 2e-9}
    flop = dict(cost, per="flop", fwd_per_unit_s=1e-11, bwd_per_unit_s=2e-11)
    data["device"].update(
        compute_share=share, pace_reference_s=reference, fsdp_unit_overhead=1e-3, collective_wait_s=wait,
        tp_overhead={"module_fwd_s": 1e-4, "module_bwd_s": 2e-4, "param_step_s": {"adam": 5e-6}},
        op_costs={"fp32": {**{op: cost for op in ("add", "view", "gelu", "layer_norm", "embedding", "module_call")},
                           "linear": flop, "scaled_dot_product_attention": flop}})
    return Cluster.model_validate(data)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.2, 5.0), st.floats(0.1, 1.0))
def test_measured_costs_follow_the_pace_and_the_share_is_the_new_one(pace: float, share: float) -> None:
    before = calibrated()
    after, got = refreshed(before, share, before.device.pace_reference_s * pace)
    assert got == pytest.approx(pace)
    linear, old = after.device.op_costs["fp32"]["linear"], before.device.op_costs["fp32"]["linear"]
    for key in ("fwd_fixed_s", "fwd_per_unit_s", "bwd_fixed_s", "bwd_per_unit_s"):
        assert getattr(linear, key) == pytest.approx(getattr(old, key) * pace, rel=1e-3)
    assert after.device.tp_overhead.module_bwd_s == pytest.approx(2e-4 * pace, rel=1e-3)
    assert after.device.tp_overhead.param_step_s["adam"] == pytest.approx(5e-6 * pace, rel=1e-3)
    assert after.device.fsdp_unit_overhead == pytest.approx(1e-3 * pace, rel=1e-3)
    assert after.device.compute_share == pytest.approx(share, rel=1e-2)
    assert after.device.pace_reference_s == pytest.approx(before.device.pace_reference_s * pace, rel=1e-3)
    assert after.intra_node == before.intra_node and after.device.memory == before.device.memory


def test_the_collective_wait_is_replaced_by_the_one_measured_now_or_kept() -> None:
    before = calibrated(wait=4e-3)
    after, _ = refreshed(before, 0.4, 0.01, 6e-3)
    assert after.device.collective_wait_s == pytest.approx(6e-3)
    kept, _ = refreshed(before, 0.4, 0.01)  # a probe that did not measure it (None) keeps the calibrated one
    assert kept.device.collective_wait_s == pytest.approx(4e-3)


def test_the_estimate_follows_a_slower_machine() -> None:
    """A machine 1.5x slower alone, same share: the measured-compute estimate grows by that much (the
    links are unchanged, so a little less)."""
    before = calibrated()
    after, _ = refreshed(before, before.device.compute_share, 1.5 * before.device.pace_reference_s)

    def step_s(cluster: Cluster) -> float:
        data = {"name": "t", "model": {"catalogue": "gpt", "args": {"layers": 2, "hidden": 32, "heads": 2, "vocab": 64,
                                                                       "seq_len": 16}},
                "training": {"global_batch": 4, "optimizer": "adam", "seed": 0},
                "cluster": {**cluster.model_dump(mode="json", exclude_none=True), "devices_per_node": 1},
                "parallel": {"dp": 1, "tp": 1, "pp": 1, "micro_batch": 4}}
        return plan(spec_from_dict(data))[0].estimate.step_time_s

    assert 1.3 < step_s(after) / step_s(before) <= 1.5 + 1e-9


def test_a_cluster_without_a_pace_reference_is_refused_with_the_fix() -> None:
    bare = Cluster.model_validate(preset_dict("cpu-local"))
    with pytest.raises(CalibrationError, match="run a full `trainplan calibrate` first"):
        refreshed(bare, 0.4, 0.01)
    with pytest.raises(CalibrationError, match="run it again"):
        refreshed(calibrated(), 0.4, 0.0)


def test_the_refreshed_yaml_reads_back_and_says_what_changed() -> None:
    before = calibrated()
    after, pace = refreshed(before, 0.35, 0.012)
    text = render_refreshed(after, before, pace, Path("cal.yaml"))
    assert Cluster.model_validate(yaml.safe_load(text)) == after
    assert text.startswith("# Refreshed by `trainplan calibrate --refresh cal.yaml`") and "pace x1.200" in text
    assert "compute_share 0.4 -> 0.35" in text
    after, pace = refreshed(before, 0.35, 0.012, 5e-3)
    assert "collective_wait_s 0 -> 0.005" in render_refreshed(after, before, pace, Path("cal.yaml"))


def test_cli_refresh_of_a_preset_cluster_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(preset_dict("cpu-local")))
    with pytest.raises(CalibrationError, match="no pace reference"):
        calibrate_main(["--refresh", str(path)])
