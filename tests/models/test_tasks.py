"""Task resolution against the model, synthetic batches and losses."""

from __future__ import annotations

import math

import pytest
import torch

from trainplan.errors import SpecError
from trainplan.ir.spec import ModelSpec, TaskSpec
from trainplan.models import build_model, example_inputs, init_parameters, loss_fn, resolve_task, synthetic_batch

GPT = ModelSpec(catalogue="gpt", args=dict(layers=1, hidden=32, heads=4, vocab=64, seq_len=16))
LLAMA = ModelSpec(catalogue="llama", args=dict(layers=2, hidden=32, heads=4, kv_heads=2, vocab=64, seq_len=16))
MLP = ModelSpec(catalogue="mlp", args=dict(input_shape=[2, 5], hidden=32, layers=2, classes=3))
CNN = ModelSpec(catalogue="cnn", args=dict(input_shape=[3, 8, 8], widths=[4, 8], blocks=1, classes=5))


def problems(exc: pytest.ExceptionInfo[SpecError]) -> list[str]:
    return [path for path, _ in exc.value.problems]


def test_lm_task_takes_vocab_and_seq_len_from_the_model() -> None:
    task = resolve_task(GPT, TaskSpec())
    assert (task.kind, task.vocab, task.seq_len) == ("lm", 64, 16)
    assert resolve_task(GPT, TaskSpec(seq_len=8)).seq_len == 8


def test_classification_task_takes_shape_and_classes_from_the_model() -> None:
    task = resolve_task(MLP, TaskSpec())  # kind not written: the model's kind is adopted
    assert (task.kind, task.input_shape, task.classes) == ("classification", [2, 5], 3)
    flat = resolve_task(MLP, TaskSpec(kind="classification", input_shape=[10]))
    assert flat.input_shape == [10]
    assert resolve_task(CNN, TaskSpec(kind="classification", input_shape=[3, 16, 16])).input_shape == [3, 16, 16]
    mlp_dim = ModelSpec(catalogue="mlp", args=dict(input_dim=7))
    assert resolve_task(mlp_dim, TaskSpec()).input_shape == [7]


@pytest.mark.parametrize(
    ("model", "task", "path", "needle"),
    [
        (GPT, TaskSpec(kind="classification"), "task.kind", "expected 'lm', got 'classification'"),
        (MLP, TaskSpec(kind="lm"), "task.kind", "expected 'classification', got 'lm'"),
        (GPT, TaskSpec(vocab=100), "task.vocab", "vocabulary is 64"),
        (GPT, TaskSpec(seq_len=17), "task.seq_len", "at most 16 positions"),
        (MLP, TaskSpec(kind="classification", input_shape=[3, 3]), "task.input_shape", "10 features"),
        (MLP, TaskSpec(kind="classification", classes=4), "task.classes", "3 classes"),
        (CNN, TaskSpec(kind="classification", input_shape=[1, 8, 8]), "task.input_shape", "[3, height, width]"),
        (MLP, TaskSpec(vocab=10), "task", "'vocab' does not apply"),
    ],
)
def test_task_mismatches_are_spec_errors_on_the_task_path(model, task, path, needle) -> None:
    with pytest.raises(SpecError) as err:
        resolve_task(model, task)
    assert problems(err) == [path]
    assert needle in str(err.value)


@pytest.mark.parametrize("model", [GPT, LLAMA, MLP, CNN], ids=["gpt", "llama", "mlp", "cnn"])
def test_resolving_is_idempotent(model: ModelSpec) -> None:
    once = resolve_task(model, TaskSpec())
    assert resolve_task(model, once) == once


def test_dataset_tasks_pass_through() -> None:
    task = TaskSpec(kind="import", **{"import": "data:load"})
    assert resolve_task(GPT, task) == task
    assert resolve_task(MLP, task) == task


def test_example_inputs_match_the_task() -> None:
    (tokens,) = example_inputs(resolve_task(GPT, TaskSpec()), batch=3)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long and tokens.is_meta
    (images,) = example_inputs(resolve_task(CNN, TaskSpec()), batch=2, device="cpu")
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32


def test_synthetic_lm_batch_is_deterministic_and_next_token() -> None:
    task = resolve_task(GPT, TaskSpec())
    inputs, targets = synthetic_batch(task, batch=8, seed=3, step=5)
    again, _ = synthetic_batch(task, batch=8, seed=3, step=5)
    other, _ = synthetic_batch(task, batch=8, seed=3, step=6)
    assert torch.equal(inputs, again) and not torch.equal(inputs, other)
    assert inputs.shape == targets.shape == (8, 16) and inputs.dtype == torch.long
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert int(inputs.min()) >= 0 and int(inputs.max()) < 64
    stride = (inputs[:, 1] - inputs[:, 0]) % 64
    assert torch.equal((inputs[:, 0:1] + stride[:, None] * torch.arange(1, 17)) % 64, targets)


def test_synthetic_classification_batch_is_deterministic() -> None:
    task = resolve_task(MLP, TaskSpec())
    inputs, targets = synthetic_batch(task, batch=64, seed=0, step=0)
    again, same_targets = synthetic_batch(task, batch=64, seed=0, step=0)
    assert torch.equal(inputs, again) and torch.equal(targets, same_targets)
    assert inputs.shape == (64, 2, 5) and targets.shape == (64,)
    assert set(targets.tolist()) == {0, 1, 2}  # 64 samples reach every class of 3
    later_inputs, _ = synthetic_batch(task, batch=64, seed=0, step=1)
    assert not torch.equal(inputs, later_inputs)


def test_synthetic_batch_needs_a_resolved_task() -> None:
    with pytest.raises(SpecError) as err:
        synthetic_batch(TaskSpec(), batch=2, seed=0, step=0)
    assert problems(err) == ["task"]


def test_lm_loss_is_token_cross_entropy() -> None:
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0, 1, 2], [3, 4, 0]])
    manual = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss_fn(TaskSpec(kind="lm"))(logits, targets), manual)
    uniform = loss_fn(TaskSpec(kind="lm"))(torch.zeros(2, 3, 5), targets)
    assert math.isclose(uniform.item(), math.log(5), rel_tol=1e-6)


def test_loss_fn_refuses_dataset_tasks() -> None:
    with pytest.raises(SpecError):
        loss_fn(TaskSpec(kind="import", **{"import": "data:load"}))


@pytest.mark.parametrize("spec", [LLAMA, MLP], ids=["llama", "mlp"])
def test_synthetic_data_is_learnable(spec: ModelSpec) -> None:
    built = build_model(spec, device="cpu")
    init_parameters(built.module, seed=0)
    optimizer = torch.optim.Adam(built.module.parameters(), lr=1e-2)
    loss = loss_fn(built.task)
    losses = []
    for step in range(40):
        inputs, targets = synthetic_batch(built.task, batch=32, seed=0, step=step)
        value = loss(built.module(inputs), targets)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
