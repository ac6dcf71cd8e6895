"""A rank that dies, raises or stalls stops the run within the collective timeout, and is named."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.runtime.faulty import DIE_EXIT_CODE
from tests.runtime.plans import make_plan
from trainplan.ir.loading import validate
from trainplan.ir.spec import Spec
from trainplan.runtime.launch import launch

pytestmark = pytest.mark.slow

TIMEOUT_S = 10


def faulty_spec(mode: str, rank: int) -> Spec:
    return validate(Spec, {
        "name": f"faulty-{mode}",
        "model": {"import": "tests.runtime.faulty:build", "args": {"mode": mode, "rank": rank}},
        "task": {"kind": "classification", "input_shape": [12], "classes": 10},
        "training": {"global_batch": 8, "steps": 3, "optimizer": "sgd", "lr": 0.1},
        "cluster": {"preset": "cpu-local", "devices_per_node": 4},
    })


def _launch(mode: str, rank: int, tmp_path: Path) -> tuple[int, str, float]:
    plan = make_plan(faulty_spec(mode, rank), dp=4, collective_timeout_s=TIMEOUT_S)
    start = time.monotonic()
    code = launch(plan, nproc=4, out_dir=tmp_path)
    return code, (tmp_path / "error.txt").read_text(), time.monotonic() - start


def test_a_rank_that_dies_is_named_and_the_run_stops(tmp_path: Path) -> None:
    code, message, elapsed = _launch("die", 1, tmp_path)
    assert code == 1
    first = message.splitlines()[0]
    assert first == (f"run failed: rank 1 exited with code {DIE_EXIT_CODE} without reporting an error "
                     "(killed, out of memory, or a crash in native code)")
    assert elapsed < TIMEOUT_S + 20  # the others did not wait for the collective timeout, let alone hang


def test_a_rank_that_raises_is_named_with_its_error(tmp_path: Path) -> None:
    code, message, _ = _launch("raise", 2, tmp_path)
    assert code == 1
    assert message.splitlines()[0] == "run failed: rank 2: RuntimeError: injected failure on rank 2"
    assert "injected failure" in message and "faulty.py" in message  # the traceback tail is shown


def test_a_rank_that_stalls_times_out_the_others(tmp_path: Path) -> None:
    code, message, elapsed = _launch("stall", 3, tmp_path)
    assert code == 1
    assert f"collective timeout {TIMEOUT_S} s" in message
    # The survivors time out together, and the launcher may stop one before it writes its record, so
    # the stalled rank is named among the ranks that were still running.
    running = re.search(r"^ranks? ([\d, ]+) (?:was|were) still running when the run was stopped", message, re.M)
    assert running is not None, message
    assert 3 in {int(r) for r in running.group(1).split(", ")}
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 30
