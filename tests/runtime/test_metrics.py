"""Which steps a run's step-time medians count (trainplan.runtime.metrics)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from trainplan.runtime.metrics import MetricsWriter, StepMetrics, measured_step_time, timed_steps


def test_timed_steps_leave_out_the_warm_up_and_the_memory_sampled_steps_where_others_exist() -> None:
    assert timed_steps([9, 5, 5, 1, 2], untimed=3) == [1, 2]
    assert timed_steps([9, 5, 5], untimed=3) == [5, 5]  # a short run: all but the warm-up
    assert timed_steps([9], untimed=3) == [9]
    assert measured_step_time([9.0, 5.0, 5.0, 1.0, 2.0, 3.0], untimed=3) == 2.0


def test_summary_medians_use_the_timed_steps(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path, 5, stream=io.StringIO())
    for step, seconds in enumerate((4.0, 3.0, 3.0, 1.0, 1.0)):
        writer.record(StepMetrics(step, 1.0, seconds, 100 / seconds, 0))
    summary = writer.summary(layout="dp=1", estimated_step_time_s=2.0, world_size=1, untimed_steps=3)
    writer.close()
    assert summary["measured_step_time_s"] == 1.0 and summary["tokens_per_s"] == 100.0
    assert json.loads((tmp_path / "summary.json").read_text())["measured_over_estimated"] == 0.5
