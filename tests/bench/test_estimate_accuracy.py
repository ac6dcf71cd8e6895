"""bench/estimate_accuracy.py's step-time error relative to the same model's dp4 row of the same sweep."""

from __future__ import annotations

import pytest

from tests.bench.scripts import load_bench


def _module():  # noqa: ANN202
    return load_bench("estimate_accuracy")


def test_a_common_drift_cancels_and_a_layouts_own_error_remains() -> None:
    rows = [
        {"case": "gpt/dp4", "status": "ok", "step_time": 0.5, "step_time_runs": [0.2, 0.5, 0.8]},
        # the same drift, run by run, and 20% of its own: +20% in every run
        {"case": "gpt/pp2", "status": "ok", "step_time": 0.8, "step_time_runs": [0.44, 0.8, 1.16]},
        {"case": "gpt/tp2", "status": "failed", "reason": "x"},
        {"case": "cnn/pp2", "status": "ok", "step_time": 0.1},  # no cnn/dp4 row: nothing to compare with
    ]
    _module().relative_to_baseline(rows)
    assert rows[0]["step_time_vs_baseline"] == pytest.approx(0.0)
    assert rows[1]["step_time_vs_baseline"] == pytest.approx(0.2)
    assert "step_time_vs_baseline" not in rows[2] and "step_time_vs_baseline" not in rows[3]


def test_time_phases_are_medians_over_ranks_and_repeats() -> None:
    bench = _module()

    def rank(forward: float | None, bubble: float | None = None) -> dict:
        phases = {name: {"rel_error": None} for name in bench.PHASES}
        phases["forward"]["rel_error"], phases["bubble"]["rel_error"] = forward, bubble
        return {"phases": phases}

    summary = {"time": {"ranks": [rank(0.1), rank(0.3), rank(-0.2), rank(None)]}}
    errors = bench.phase_errors(summary)
    assert errors["forward"] == pytest.approx(0.1) and errors["bubble"] is None  # no pipeline: no bubble estimate

    def run(k: int) -> list[dict]:
        return [{"case": "gpt/dp4", "status": "ok", "step_time": 0.1 * k, "step_time_s": 1.0, "step_time_estimate_s": 1.0,
                 "phases": {**dict.fromkeys(bench.PHASES), "forward": [0.3, -0.1, 0.5][k], "update": [None, 0.2, None][k]}}]

    rows = bench.repeated(run, 3)
    assert rows[0]["phases"]["forward"] == pytest.approx(0.3) and rows[0]["phases"]["update"] == pytest.approx(0.2)
    assert bench.phases_within(rows, 0.25)["forward"] == [0, 1] and bench.phases_within(rows, 0.25)["update"] == [1, 1]
