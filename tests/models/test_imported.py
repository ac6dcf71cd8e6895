"""``model: {import: pkg.mod:fn}``: user code found next to the spec, every failure a SpecError."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from trainplan.errors import SpecError
from trainplan.ir.spec import ModelSpec, TaskSpec
from trainplan.models import build_model, resolve_task

USER_CODE = """
import torch
from torch import nn
from trainplan.ir.facts import TransformerFacts


class Tiny(nn.Module):
    def __init__(self, vocab, hidden):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.out = nn.Linear(hidden, vocab)
        self.vocab = vocab

    def forward(self, tokens):
        return self.out(self.emb(tokens))

    def trainplan_facts(self):
        return TransformerFacts(kind="decoder", layers=1, hidden=8, heads=2, kv_heads=2,
                                ffn_hidden=32, vocab=self.vocab, seq_len=16, tied_embeddings=False)


def tiny(vocab=10, hidden=8):
    return Tiny(vocab, hidden)


def classifier(features, classes):
    return nn.Linear(features, classes)


def not_a_module():
    return {"weights": 1}


def explodes(size):
    raise RuntimeError(f"size {size} is too large")


def bad_facts():
    model = nn.Linear(2, 2)
    model.trainplan_facts = lambda: {"layers": 1}
    return model


NOT_CALLABLE = 3
"""
LM_TASK = TaskSpec(kind="lm", vocab=10, seq_len=16)


@pytest.fixture
def user_module(tmp_path: Path) -> tuple[str, Path]:
    """A uniquely named module in a fresh folder (module caches never leak between tests)."""
    name = f"user_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_CODE))
    return name, tmp_path


def spec(path: str, **args) -> ModelSpec:
    return ModelSpec(**{"import": path, "args": args})


def error_of(model: ModelSpec, task: TaskSpec = LM_TASK, base_dir: Path | None = None) -> SpecError:
    with pytest.raises(SpecError) as err:
        build_model(model, task, base_dir=base_dir)
    return err.value


def test_builds_on_meta_from_the_spec_folder_with_declared_facts(user_module) -> None:
    name, folder = user_module
    before = list(sys.path)
    built = build_model(spec(f"{name}:tiny", hidden=4), LM_TASK, base_dir=folder)
    assert sys.path == before
    assert all(p.is_meta for p in built.module.parameters())
    assert built.module.emb.weight.shape == (10, 4)
    assert built.facts is not None and built.facts.vocab == 10
    assert built.task == LM_TASK


def test_builds_on_cpu_without_facts(user_module) -> None:
    name, folder = user_module
    task = TaskSpec(kind="classification", input_shape=[6], classes=3)
    built = build_model(spec(f"{name}:classifier", features=6, classes=3), task, device="cpu", base_dir=folder)
    assert built.facts is None
    assert built.module(torch.zeros(2, 6)).shape == (2, 3)


def test_missing_module_says_where_it_was_looked_for(tmp_path: Path) -> None:
    err = error_of(spec("no_such_pkg.models:build"), base_dir=tmp_path)
    assert err.problems == [
        ("model.import", "cannot import module 'no_such_pkg.models' (No module named 'no_such_pkg'); "
         "is it on the Python path or next to the spec?")
    ]


def test_module_importing_a_missing_package(tmp_path: Path) -> None:
    name = f"user_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import not_installed_dependency_xyz\n")
    err = error_of(spec(f"{name}:build"), base_dir=tmp_path)
    assert err.problems[0][0] == "model.import"
    assert "No module named 'not_installed_dependency_xyz'" in err.problems[0][1]
    assert f"importing module '{name}' failed" in err.problems[0][1]


def test_module_with_a_syntax_error(tmp_path: Path) -> None:
    name = f"user_model_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def build(:\n")
    err = error_of(spec(f"{name}:build"), base_dir=tmp_path)
    assert err.problems[0][0] == "model.import" and "raised SyntaxError" in err.problems[0][1]


def test_missing_function_lists_what_the_module_defines(user_module) -> None:
    name, folder = user_module
    err = error_of(spec(f"{name}:tinny"), base_dir=folder)
    assert err.problems[0][0] == "model.import"
    assert f"module '{name}' has no function 'tinny'" in err.problems[0][1]
    assert "tiny" in err.problems[0][1] and "classifier" in err.problems[0][1]


def test_not_callable(user_module) -> None:
    name, folder = user_module
    err = error_of(spec(f"{name}:NOT_CALLABLE"), base_dir=folder)
    assert err.problems[0][0] == "model.import" and "is a int" in err.problems[0][1]


@pytest.mark.parametrize("args", [{"hiden": 3}, {}], ids=["unknown", "missing"])
def test_wrong_args_are_reported_under_model_args(user_module, args) -> None:
    name, folder = user_module
    fn = "tiny" if args else "classifier"
    err = error_of(spec(f"{name}:{fn}", **args), base_dir=folder)
    assert err.problems[0][0] == "model.args"
    assert "whose parameters are" in err.problems[0][1]


def test_returning_something_else_than_a_module(user_module) -> None:
    name, folder = user_module
    err = error_of(spec(f"{name}:not_a_module"), base_dir=folder)
    assert err.problems == [("model.import", f"'{name}:not_a_module' returned dict, expected a torch.nn.Module")]


def test_exception_in_user_code_names_the_function_and_message(user_module) -> None:
    name, folder = user_module
    err = error_of(spec(f"{name}:explodes", size=7), base_dir=folder)
    assert err.problems == [("model.import", f"'{name}:explodes' raised RuntimeError: size 7 is too large")]


def test_facts_of_the_wrong_type(user_module) -> None:
    name, folder = user_module
    err = error_of(spec(f"{name}:bad_facts"), base_dir=folder)
    assert "expected trainplan.ir.facts.TransformerFacts" in err.problems[0][1]


def test_declared_facts_must_agree_with_the_task(user_module) -> None:
    name, folder = user_module
    err = error_of(spec(f"{name}:tiny"), TaskSpec(kind="lm", vocab=11, seq_len=16), base_dir=folder)
    assert err.problems[0][0] == "task.vocab"


@pytest.mark.parametrize(
    ("task", "paths"),
    [
        (TaskSpec(), ["task.vocab", "task.seq_len"]),
        (TaskSpec(kind="lm", vocab=10), ["task.seq_len"]),
        (TaskSpec(kind="classification", classes=3), ["task.input_shape"]),
    ],
)
def test_the_task_must_be_given_in_full(task: TaskSpec, paths: list[str]) -> None:
    with pytest.raises(SpecError) as err:
        resolve_task(spec("anything:build"), task)
    assert [p for p, _ in err.value.problems] == paths
    assert "spelled out" in str(err.value)


def test_a_yaml_spec_finds_its_model_next_to_it(user_module) -> None:
    from trainplan.ir.loading import load
    from trainplan.ir.spec import Spec

    name, folder = user_module
    path = folder / "run.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: user-model
        model: {{import: "{name}:classifier", args: {{features: 12, classes: 4}}}}
        task: {{kind: classification, input_shape: [12], classes: 4}}
        training: {{global_batch: 8}}
        cluster: {{preset: cpu-local}}
        """))
    loaded = load(Spec, path)
    built = build_model(loaded.model, loaded.task, device="cpu", base_dir=path.parent)
    assert built.task.input_shape == [12]
    assert built.module(torch.zeros(2, 12)).shape == (2, 4)
