"""Resume, elastic restart after a killed rank, corrupt-checkpoint fallback and resharding, with real gloo groups.

Each resumed run is compared with the uninterrupted run of the same layout (losses and final
parameters bit-equal: the same arithmetic in the same order), or — after resharding to another
layout — with that layout's uninterrupted run within the equivalence tolerance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.runtime.equivalence import final_params, losses, zero_gradient_params
from tests.runtime.plans import GPT_TP_STYLES, gpt_spec, make_plan
from trainplan.runtime.checkpoint import CheckpointOptions, read_manifest, verify
from trainplan.runtime.launch import launch, launch_sweep

pytestmark = pytest.mark.slow

STEPS = 4


def plans() -> dict[str, object]:
    spec = gpt_spec(2, steps=STEPS)
    return {"dp2": make_plan(spec, dp=2), "pp2": make_plan(spec, pp=2, micro_batch=2),
            "tp2": make_plan(spec, tp=2, tp_styles=GPT_TP_STYLES)}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Uninterrupted runs of every layout (one sweep), saved parameters included."""
    root = tmp_path_factory.mktemp("checkpoint")
    layouts = plans()
    code = launch_sweep(list(layouts.values()), nproc=2, out_dirs=[root / f"base-{n}" for n in layouts],
                        run_dir=root / "base", save_params=True)
    assert code == 0, (root / "base" / "error.txt").read_text()
    return root


def assert_identical(out: Path, base: Path) -> None:
    assert losses(out) == losses(base)
    ours, theirs = final_params(out), final_params(base)
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name


def assert_close(out: Path, base: Path, spec) -> None:
    """Losses within 1e-5 relative; parameters within 5e-5 (Adam's zero-gradient ones within its step bound).

    Another layout sums in another order; Adam turns those fp32 differences into parameter
    differences up to ~2e-5 after 4 steps here. A lost or reset optimizer state moves a parameter
    by up to lr = 1e-2 per step (Adam's first step is ~lr per element), far beyond 5e-5.
    """
    for a, b in zip(losses(out), losses(base), strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (losses(out), losses(base))
    ours, theirs = final_params(out), final_params(base)
    noisy = zero_gradient_params(spec)
    for name, value in ours.items():
        limit = 4 * spec.training.lr * STEPS if name in noisy else 5e-5
        assert float((value - theirs[name]).abs().max()) <= limit, name


def killed_run(root: Path, layout: str) -> Path:
    """Checkpoint every 2 steps; rank 1 SIGKILLs itself before step 3; one restart allowed."""
    out = root / f"killed-{layout}"
    if not out.exists():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRAINPLAN_FAULT", "kill:rank=1:step=3")
            code = launch(plans()[layout], nproc=2, out_dir=out, save_params=True, max_restarts=1,
                          checkpoint=CheckpointOptions(out / "ckpt", every_steps=2))
        assert code == 0, (out / "error.txt").read_text()
    return out


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_killed_rank_restarts_and_matches_the_uninterrupted_run(root, layout):
    killed = killed_run(root, layout)
    fault = json.loads((killed / "faults.jsonl").read_text())
    resume = json.loads((killed / "resumes.jsonl").read_text())
    assert (fault["rank"], fault["step"], resume["from_step"], resume["restart"]) == (1, 3, 2, 1)
    recovery = (resume["time_ns"] - fault["time_ns"]) / 1e9
    print(f"\n{layout}: SIGKILL rank 1 before step 3: recovered in {recovery:.2f} s (kill -> first step after "
          f"resume), {fault['step'] - resume['from_step']} step lost, checkpoint load {resume['load_s']:.2f} s")
    assert [p.name for p in sorted((killed / "ckpt").iterdir())] == ["step-000002", "step-000004"]
    assert [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    assert_identical(killed, root / f"base-{layout}")


def test_pipeline_checkpoint_resumes_without_pipeline(root):
    """pp=2 -> dp=2: the stages' whole-model names and optimizer state load into one replicated model."""
    ckpt = root / "pp2-to-dp2" / "ckpt"
    shutil.copytree(killed_run(root, "pp2") / "ckpt" / "step-000002", ckpt / "step-000002")
    out = root / "pp2-to-dp2"
    code = launch(plans()["dp2"], nproc=2, out_dir=out, save_params=True, checkpoint=CheckpointOptions(ckpt, resume=True))
    assert code == 0, (out / "error.txt").read_text()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 3]
    base = root / "base-dp2"
    (out / "base").mkdir()
    (out / "base" / "metrics.jsonl").write_text("\n".join((base / "metrics.jsonl").read_text().splitlines()[2:]) + "\n")
    shutil.copytree(base / "params", out / "base" / "params")
    assert_close(out, out / "base", plans()["dp2"].spec)


def test_corrupt_newest_checkpoint_falls_back_and_reshards_to_tensor_parallel(root, capfd):
    """The killed run's step-4 checkpoint is damaged: step 2 is loaded instead, into a tp=2 layout."""
    ckpt = root / "to-tp2" / "ckpt"
    shutil.copytree(killed_run(root, "dp2") / "ckpt", ckpt)
    shard = next((ckpt / "step-000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    out = root / "to-tp2"
    code = launch(plans()["tp2"], nproc=2, out_dir=out, save_params=True, checkpoint=CheckpointOptions(ckpt, resume=True))
    assert code == 0, (out / "error.txt").read_text()
    err = capfd.readouterr().err
    assert "skipping checkpoint" in err and "step-000004" in err and "truncated" in err
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 3]
    base = root / "base-tp2"
    (out / "base").mkdir()
    (out / "base" / "metrics.jsonl").write_text("\n".join((base / "metrics.jsonl").read_text().splitlines()[2:]) + "\n")
    shutil.copytree(base / "params", out / "base" / "params")
    assert_close(out, out / "base", plans()["tp2"].spec)


def test_async_saves_killed_mid_write_never_commit_and_the_restart_matches(root):
    """Checkpoints every step, written in the background; rank 1 SIGKILLs itself right after the save of step 3
    started. That save can never be committed (the commit needs every rank's write and a barrier), so the
    restart resumes from step 2; the run's losses and parameters equal the uninterrupted (sync) run's."""
    out = root / "async-killed"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAINPLAN_FAULT", "kill:rank=1:step=3")
        code = launch(plans()["dp2"], nproc=2, out_dir=out, save_params=True, max_restarts=1,
                      checkpoint=CheckpointOptions(out / "ckpt", every_steps=1, asynchronous=True))
    assert code == 0, (out / "error.txt").read_text()
    resume = json.loads((out / "resumes.jsonl").read_text())
    assert resume["from_step"] == 2 and resume["checkpoint"] == "step-000002"
    logs = "".join(p.read_text(errors="replace") for p in (out / "logs").rglob("*.log"))
    assert "skipping checkpoint" not in logs  # no half-written checkpoint was ever marked complete
    assert [p.name for p in sorted((out / "ckpt").iterdir())] == ["step-000002", "step-000003", "step-000004"]
    for folder in sorted((out / "ckpt").iterdir()):
        verify(folder, read_manifest(folder))
    saves = [json.loads(line) for line in (out / "checkpoints.jsonl").read_text().splitlines()]
    # Attempt 1 committed 1 and 2 (3 was in flight when rank 1 died); the restart committed 3 and 4.
    assert [r["step"] for r in saves if "step" in r] == [1, 2, 3, 4] and all(r["asynchronous"] for r in saves)
    assert_identical(out, root / "base-dp2")


def test_stopped_rank_times_out_restarts_and_matches_the_uninterrupted_run(root):
    """Rank 1 SIGSTOPs itself before step 3 (a hang): rank 0's collective times out after 5 s, the
    launcher continues the stopped worker so the agent's SIGTERM lands, and the restart resumes."""
    out = root / "stopped-dp2"
    plan = make_plan(gpt_spec(2, steps=STEPS), dp=2, collective_timeout_s=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAINPLAN_FAULT", "stop:rank=1:step=3")
        code = launch(plan, nproc=2, out_dir=out, save_params=True, max_restarts=1,
                      checkpoint=CheckpointOptions(out / "ckpt", every_steps=2))
    assert code == 0, (out / "error.txt").read_text()
    fault = json.loads((out / "faults.jsonl").read_text())
    resume = json.loads((out / "resumes.jsonl").read_text())
    assert (fault["rank"], fault["step"], resume["from_step"], resume["restart"]) == (1, 3, 2, 1)
    print(f"\nSIGSTOP rank 1 before step 3: recovered in {(resume['time_ns'] - fault['time_ns']) / 1e9:.2f} s "
          "(collective timeout 5 s)")
    assert_identical(out, root / "base-dp2")
