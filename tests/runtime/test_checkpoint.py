"""Checkpoint folders without processes: commit, manifest checks, fallback, bad input, safe metadata reading."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from tests.runtime.plans import gpt_spec, make_plan
from trainplan.cli import main
from trainplan.ir.loading import dump_yaml
from trainplan.runtime.checkpoint import (
    CheckpointError, CheckpointOptions, SafeFileSystemReader, check_checkpoint_dir, commit, find_latest,
    identity_hash, inject_fault, parse_fault, recover_interrupted, step_name, worker_args,
)


def fake_checkpoint(directory: Path, plan, step: int, payload: bytes = b"x" * 64) -> Path:
    """A committed checkpoint folder whose 'shard' is ``payload`` (the manifest logic does not read DCP files)."""
    final = directory / step_name(step)
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir(parents=True)
    (tmp / "__0_0.distcp").write_bytes(payload)
    (tmp / ".metadata").write_bytes(b"meta")
    commit(tmp, final, plan, step)
    return final


@pytest.fixture
def plan():
    return make_plan(gpt_spec(2), dp=2)


def test_commit_is_atomic_and_newest_complete_wins(tmp_path, plan):
    fake_checkpoint(tmp_path, plan, 2)
    fake_checkpoint(tmp_path, plan, 4)
    (tmp_path / "step-000006.tmp").mkdir()  # a save cut short: never taken as a checkpoint
    found = find_latest(tmp_path, plan.spec)
    assert found is not None and found.step == 4 and found.path.name == "step-000004"
    manifest = json.loads((found.path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"__0_0.distcp", ".metadata", "plan.yaml"}
    assert manifest["identity_hash"] == identity_hash(plan.spec) and manifest["mesh"] == {"pp": 1, "dp": 2, "tp": 1}


@pytest.mark.parametrize("damage, why", [
    (lambda p: p.write_bytes(b"y" * 64), "does not match its sha256"),
    (lambda p: p.write_bytes(b"x" * 10), "truncated"),
    (lambda p: p.unlink(), "is missing"),
    (lambda p: (p.parent / "manifest.json").unlink(), "no manifest.json"),
    (lambda p: (p.parent / "manifest.json").write_text("{"), "unreadable"),
])
def test_corrupt_checkpoint_is_skipped_with_a_warning(tmp_path, plan, damage, why):
    fake_checkpoint(tmp_path, plan, 2)
    newest = fake_checkpoint(tmp_path, plan, 4)
    damage(newest / "__0_0.distcp")
    warnings: list[str] = []
    found = find_latest(tmp_path, plan.spec, warn=warnings.append)
    assert found is not None and found.step == 2
    assert len(warnings) == 1 and "step-000004" in warnings[0] and why in warnings[0], warnings
    assert "falling back" in warnings[0]


def test_every_checkpoint_corrupt_is_an_error(tmp_path, plan):
    newest = fake_checkpoint(tmp_path, plan, 2)
    (newest / "__0_0.distcp").write_bytes(b"")
    options = CheckpointOptions(tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        check_checkpoint_dir(options, plan)


def test_foreign_checkpoint_names_what_differs(tmp_path, plan):
    fake_checkpoint(tmp_path, plan, 2)
    other = make_plan(gpt_spec(2, layers=2), dp=2)
    with pytest.raises(CheckpointError, match=r"another spec .*model.args.layers: 4 in the checkpoint, 2 now"):
        find_latest(tmp_path, other.spec)


def test_replanned_spec_keeps_its_identity(plan):
    """A re-plan changes the cluster, the layout and the steps, not what the checkpoint is tied to."""
    replanned = make_plan(gpt_spec(4, steps=9, lr=3e-2), dp=2, tp=2, tp_styles={"wte": "vocab"})
    assert replanned.spec_hash != plan.spec_hash
    assert identity_hash(replanned.spec) == identity_hash(plan.spec)


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path, plan):
    fake_checkpoint(tmp_path, plan, 2)
    with pytest.raises(CheckpointError, match="already holds checkpoints .*--resume"):
        check_checkpoint_dir(CheckpointOptions(tmp_path, every_steps=2), plan)


def test_worker_args_round_trip(tmp_path):
    args = worker_args(CheckpointOptions(tmp_path, every_steps=3, every_minutes=1.5, keep=2, resume=True))
    assert args == ["--checkpoint-dir", str(tmp_path.resolve()), "--keep-checkpoints", "2", "--checkpoint-every", "3",
                    "--checkpoint-minutes", "1.5", "--resume"]
    options = CheckpointOptions(tmp_path, every_steps=3, resume_if_present=True, asynchronous=True)
    args = worker_args(options)
    assert args[-2:] == ["--resume-if-present", "--checkpoint-async"]
    from trainplan.runtime.worker import checkpoint_options, parse_args

    parsed = checkpoint_options(parse_args(["--run-dir", "r", "--plan", "p.yaml", "--out", "o", *args]))
    assert parsed == CheckpointOptions(tmp_path.resolve(), every_steps=3, resume_if_present=True, asynchronous=True)


def test_commit_over_an_existing_step_replaces_it(tmp_path, plan):
    """Resuming past a corrupt newer checkpoint writes that step again: the new folder takes its place."""
    fake_checkpoint(tmp_path, plan, 4, payload=b"old" * 10)
    fake_checkpoint(tmp_path, plan, 4, payload=b"new" * 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004"]
    assert (tmp_path / "step-000004" / "__0_0.distcp").read_bytes() == b"new" * 10
    assert find_latest(tmp_path, plan.spec).step == 4


def test_a_commit_cut_short_between_its_renames_loses_nothing(tmp_path, plan, monkeypatch):
    """A crash after the old step-N was moved aside and before the new one was renamed in: the old one comes back."""
    fake_checkpoint(tmp_path, plan, 4, payload=b"old" * 10)
    real_rename = os.rename

    def crash_on_second_rename(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr("trainplan.runtime.checkpoint.os.rename", crash_on_second_rename)
    with pytest.raises(OSError, match="simulated crash"):
        fake_checkpoint(tmp_path, plan, 4, payload=b"new" * 10)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004.replaced", "step-000004.tmp"]
    found = find_latest(tmp_path, plan.spec)
    assert found is not None and found.step == 4
    assert (found.path / "__0_0.distcp").read_bytes() == b"old" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000004.tmp"]


def test_an_aside_left_after_a_finished_swap_is_removed(tmp_path, plan):
    fake_checkpoint(tmp_path, plan, 4, payload=b"new" * 10)
    shutil.copytree(tmp_path / "step-000004", tmp_path / "step-000004.replaced")  # crash before the aside was removed
    assert recover_interrupted(tmp_path) == ["removed step-000004.replaced (replaced by step-000004)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004"]


def test_a_fault_fires_once_per_output_folder(tmp_path):
    """Agents of other nodes restart their workers with TORCHELASTIC_RESTART_COUNT=0: faults.jsonl stops a second firing."""
    fault = parse_fault("raise:rank=1:step=2")
    inject_fault(fault, 0, 2, tmp_path)  # another rank: nothing
    inject_fault(fault, 1, 1, tmp_path)  # another step: nothing
    assert not (tmp_path / "faults.jsonl").exists()
    with pytest.raises(RuntimeError, match="injected fault"):
        inject_fault(fault, 1, 2, tmp_path)
    inject_fault(fault, 1, 2, tmp_path)  # already fired in this folder
    assert len((tmp_path / "faults.jsonl").read_text().splitlines()) == 1


def test_metadata_reader_refuses_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        SafeFileSystemReader(tmp_path).read_metadata()


@pytest.mark.parametrize("text", ["kill:rank=1", "explode:rank=1:step=2", "kill:rank=a:step=2", "kill:rank=1:step=2:x=3"])
def test_bad_fault_spec(text):
    with pytest.raises(CheckpointError, match="TRAINPLAN_FAULT"):
        parse_fault(text)


def test_parse_fault():
    fault = parse_fault("stop:rank=3:step=7")
    assert (fault.kind, fault.rank, fault.step) == ("stop", 3, 7)


def cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_cli_resume_bad_inputs(tmp_path, capsys, plan):
    path = tmp_path / "plan.yaml"
    path.write_text(dump_yaml(plan))
    code, err = cli(capsys, "run", str(path), "--resume", str(tmp_path / "nope"))
    assert code == 2 and "--resume" in err and "no such folder" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = cli(capsys, "run", str(path), "--resume", str(empty))
    assert code == 2 and "no complete checkpoint" in err
    foreign = tmp_path / "foreign"
    fake_checkpoint(foreign, make_plan(gpt_spec(2, seed=11), dp=2), 2)
    code, err = cli(capsys, "run", str(path), "--resume", str(foreign))
    assert code == 2 and "another spec" in err and "training.seed: 11 in the checkpoint, 3 now" in err
    code, err = cli(capsys, "run", str(path), "--nproc", "1", "--resume")
    assert code == 2
    code, err = cli(capsys, "run", str(path), "--checkpoint-async")
    assert code == 2 and "--checkpoint-async needs --checkpoint-every N or --checkpoint-minutes M" in err


def test_cli_replan_for_fewer_processes(tmp_path, capsys, plan):
    path = tmp_path / "plan.yaml"
    path.write_text(dump_yaml(make_plan(gpt_spec(4), dp=4)))
    code = main(["replan", str(path), "--nproc", "2", "-o", str(tmp_path / "new")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "for 2 devices (was 4" in out
    from trainplan import api

    new = api.load_plan(tmp_path / "new" / "plan.yaml")
    assert new.mesh.world_size == 2 and identity_hash(new.spec) == identity_hash(plan.spec)
    code, err = cli(capsys, "replan", str(tmp_path / "new" / "report.json"), "--nproc", "2")
    assert code == 2
