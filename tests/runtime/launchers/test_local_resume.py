"""`trainplan launch --on local --checkpoint-every N --max-restarts R`: a worker killed on one node; both agents
restart their workers, which resume from the newest complete checkpoint and finish the run."""

from __future__ import annotations

import io
import json
import sys

import pytest

from trainplan.ir.loading import load
from trainplan.ir.plan import Plan
from trainplan.runtime.checkpoint import CheckpointError, find_latest, read_manifest, verify
from trainplan.runtime.launchers import LaunchError, launch
from trainplan.runtime.launchers.command import Checkpointing
from trainplan.runtime.train import run_reference


def steps_and_losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.slow
def test_a_killed_rank_restarts_both_agents_and_resumes_from_the_checkpoint(plan_files, tmp_path, monkeypatch):
    # Rank 3 SIGKILLs itself before step 3 (after the step-2 checkpoint). Its agent restarts its workers; the
    # other agent's workers, whose restart count stays 0, also resume (--resume-if-present), and the fault does
    # not fire again in the new round, wherever rank 3 lands (faults.jsonl).
    out = tmp_path / "run"
    monkeypatch.setenv("TRAINPLAN_FAULT", "kill:rank=3:step=3")
    code = launch(plan_files["cpu_2x2_4_steps"], "local", out_dir=out, max_restarts=1, timeout_s=240,
                  checkpoint=Checkpointing(every_steps=2), stdout=io.StringIO())
    assert code == 0, "\n".join(p.read_text()[-3000:] for p in (out / "agents").glob("*.log"))
    faults = [json.loads(line) for line in (out / "faults.jsonl").read_text().splitlines()]
    assert [(f["rank"], f["step"]) for f in faults] == [(3, 3)]
    resumes = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert [r["from_step"] for r in resumes] == [2]  # resumed, not started again from step 0
    assert [p.name for p in sorted((out / "ckpt").iterdir())] == ["step-000002", "step-000004"]
    for folder in sorted((out / "ckpt").iterdir()):
        verify(folder, read_manifest(folder))
    # The uninterrupted run: the single-process reference of the same spec (dp=4 SGD sums in another order,
    # rounding only; a lost or reset state would move the loss by orders of magnitude more).
    reference = tmp_path / "reference"
    run_reference(load(Plan, plan_files["cpu_2x2_4_steps"]).spec, reference)
    ours, theirs = steps_and_losses(out / "metrics.jsonl"), steps_and_losses(reference / "metrics.jsonl")
    assert [s for s, _ in ours] == [s for s, _ in theirs] == [0, 1, 2, 3]
    for (_, a), (_, b) in zip(ours, theirs):
        assert abs(a - b) <= 1e-6 * abs(b), (ours, theirs)


def test_local_launch_refuses_a_folder_with_checkpoints_unless_resumed(plan_files, tmp_path):
    # A fresh launch into a folder with checkpoints is refused before anything starts (every worker resumes when it
    # can, so it would silently continue another run); --resume without a checkpoint is refused too.
    from tests.runtime.test_checkpoint import fake_checkpoint

    out = tmp_path / "run"
    plan = load(Plan, plan_files["cpu_2x2_4_steps"])
    with pytest.raises(CheckpointError, match="no such folder"):
        launch(plan_files["cpu_2x2_4_steps"], "local", out_dir=out, checkpoint=Checkpointing(resume=True))
    fake_checkpoint(out / "ckpt", plan, 2)
    with pytest.raises(CheckpointError, match="already holds checkpoints .*--resume"):
        launch(plan_files["cpu_2x2_4_steps"], "local", out_dir=out, checkpoint=Checkpointing(every_steps=2))
    assert not (out / "agents").exists()
    with pytest.raises(LaunchError, match="--checkpoint-every must be a positive"):
        launch(plan_files["cpu_2x2_4_steps"], "local", out_dir=out, checkpoint=Checkpointing(every_steps=0))
    assert find_latest(out / "ckpt", plan.spec).step == 2


def test_dry_run_shows_the_checkpoint_flags(plan_files, tmp_path):
    text = io.StringIO()
    assert launch(plan_files["cpu_2x2"], "local", dry_run=True, out_dir=tmp_path / "run", stdout=text,
                  checkpoint=Checkpointing(every_steps=5, keep=2, asynchronous=True)) == 0
    for line in (line for line in text.getvalue().splitlines() if not line.startswith("#")):
        assert (f"--checkpoint-dir {tmp_path / 'run' / 'ckpt'} --keep-checkpoints 2 --checkpoint-every 5 "
                "--resume-if-present --checkpoint-async") in line
    assert sys.executable in text.getvalue()
