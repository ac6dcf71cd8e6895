"""``auto_parallelize`` in a user's torchrun script equals the single-process run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.equivalence import losses
from tests.runtime.plans import gpt_spec, make_plan
from trainplan.ir.loading import dump_yaml, validate
from trainplan.ir.spec import Spec
from trainplan.runtime.launch import run_reference

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("api_script.py")


def test_auto_parallelize_pipelined_step_equals_single_process(tmp_path: Path, repo: Path) -> None:
    spec = validate(Spec, gpt_spec(4, lr=1e-3))
    run_reference(spec, tmp_path / "reference")
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(dump_yaml(make_plan(spec, pp=2, dp=2, micro_batch=1, schedule="1f1b")))
    out = tmp_path / "losses.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
               str(SCRIPT), str(plan_path), str(out)]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, reference = json.loads(out.read_text()), losses(tmp_path / "reference")
    assert max(abs(a - b) / b for a, b in zip(ours, reference)) < 1e-5, (ours, reference)
