"""``trainplan.auto_parallelize``: plan a model object for the running group and parallelise it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.auto_script import GPT_TRAINING, USER_TRAINING, user_model
from tests.runtime.equivalence import losses
from tests.runtime.plans import gpt_spec
from trainplan.auto import _spec, auto_parallelize, default_cluster, infer_task, meta_skeleton, model_facts
from trainplan.errors import SpecError
from trainplan.ir.loading import validate
from trainplan.ir.spec import Spec, TaskSpec, TrainingSpec
from trainplan.models import synthetic_batch
from trainplan.models.gpt import GPT, GPTConfig
from trainplan.models.registry import classification_loss
from trainplan.runtime.data_parallel import optimizer_kwargs
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.launch import run_reference
from trainplan.runtime.precision import flush_denormals

SCRIPT = Path(__file__).with_name("auto_script.py")
TINY_GPT = GPTConfig(layers=2, hidden=32, heads=4, vocab=64, seq_len=16)


def test_meta_skeleton_copies_no_data_and_keeps_ties() -> None:
    model = GPT(TINY_GPT.model_copy(update={"tie_embeddings": True}))
    skeleton = meta_skeleton(model)
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(p.is_meta for p in model.parameters())  # the user's model is untouched
    assert skeleton.lm_head.weight is skeleton.wte.weight
    assert [n for n, _ in skeleton.named_parameters()] == [n for n, _ in model.named_parameters()]


def test_task_inferred_from_inputs_and_output_shape() -> None:
    lm = infer_task(meta_skeleton(GPT(TINY_GPT)), (torch.zeros(3, 16, dtype=torch.long),))
    assert (lm.kind, lm.vocab, lm.seq_len) == ("lm", 64, 16)
    classifier = infer_task(meta_skeleton(user_model()), (torch.zeros(5, 12),))
    assert (classifier.kind, classifier.input_shape, classifier.classes) == ("classification", [12], 10)


def test_task_that_cannot_be_inferred_asks_for_task() -> None:
    with pytest.raises(SpecError, match="pass task="):
        infer_task(meta_skeleton(nn.Linear(4, 4)), (torch.zeros(2, 3, 4),))
    with pytest.raises(SpecError, match="could not run the model"):
        infer_task(meta_skeleton(nn.Linear(4, 4)), (torch.zeros(2, 5),))


def test_facts_of_a_catalogue_model_come_from_its_config() -> None:
    facts = model_facts(GPT(TINY_GPT))
    assert facts is not None and (facts.layers, facts.hidden, facts.heads) == (2, 32, 4)
    assert model_facts(user_model()) is None


def test_default_cluster_is_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    if torch.cuda.is_available():
        pytest.skip("the CPU default is checked on a machine without CUDA")
    assert default_cluster(4) == {"preset": "cpu-local", "nodes": 2, "devices_per_node": 2}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(SpecError, match="does not divide"):
        default_cluster(4)


def test_bad_planning_arguments_are_spec_errors_naming_the_field() -> None:
    task = TaskSpec(kind="classification", input_shape=[12], classes=10)
    cluster = {"preset": "cpu-local", "devices_per_node": 2}
    with pytest.raises(SpecError, match="parallel.zero"):
        _spec(user_model(), (torch.zeros(4, 12),), task, cluster, None, {"zero": 7}, None)
    with pytest.raises(SpecError, match="parallel.pipeline"):
        _spec(user_model(), (torch.zeros(4, 12),), task, cluster, None, {"pipeline": 2}, None)
    spec = _spec(user_model(), (torch.zeros(4, 12),), task, cluster, {"lr": 0.1}, {"dp": 2}, None)
    assert spec.model.instance == "torch.nn.modules.container:Sequential"
    assert (spec.training.global_batch, spec.training.lr, spec.parallel.dp) == (4, 0.1, 2)


def test_a_plan_and_planning_arguments_together_are_refused(tmp_path: Path) -> None:
    from tests.runtime.plans import make_plan

    plan = make_plan(validate(Spec, gpt_spec(2)), dp=2)
    with pytest.raises(PlanExecutionError, match="not both"):
        auto_parallelize(user_model(), (torch.zeros(4, 12),), plan=plan, dp=2)


def test_a_spec_made_for_a_model_object_cannot_be_run_without_it() -> None:
    from trainplan.models import build_model

    spec = _spec(user_model(), (torch.zeros(4, 12),), TaskSpec(kind="classification", input_shape=[12], classes=10),
                 {"preset": "cpu-local", "devices_per_node": 2}, None, {}, None)
    with pytest.raises(SpecError, match="cannot be rebuilt from the spec"):
        build_model(spec.model, spec.task)


def _user_reference(steps: int = 3) -> list[float]:
    """The plain single-process loop a user would write for the script's ``user`` model."""
    training = TrainingSpec.model_validate(USER_TRAINING)
    flush_denormals(torch.device("cpu"))  # as trainplan's workers compute
    model = user_model()
    optimizer = torch.optim.Adam(model.parameters(), **optimizer_kwargs(training))
    task = TaskSpec(kind="classification", input_shape=[12], classes=10)
    out = []
    for step in range(steps):
        inputs, targets = synthetic_batch(task, training.global_batch, training.seed, step)
        loss = classification_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(float(loss.detach()))
    return out


@pytest.mark.slow
def test_auto_parallelize_plans_and_trains_like_one_process(tmp_path: Path, repo: Path) -> None:
    run_reference(validate(Spec, gpt_spec(4, lr=GPT_TRAINING["lr"], seed=GPT_TRAINING["seed"])), tmp_path / "gpt")
    out = tmp_path / "auto.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
               str(SCRIPT), str(out)]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    gpt, reference = results["gpt"]["losses"], losses(tmp_path / "gpt")
    assert max(abs(a - b) / b for a, b in zip(gpt, reference)) < 1e-5, (gpt, reference, results["gpt"])
    user, reference = results["user"]["losses"], _user_reference()
    assert results["user"]["mesh"]["dp"] == 2  # the fixed field was honoured
    assert max(abs(a - b) / b for a, b in zip(user, reference)) < 1e-5, (user, reference, results["user"])
