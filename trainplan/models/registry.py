"""The catalogue and the single entry point that builds a spec's model.

Three sources (``ModelSpec``): a catalogue model (``catalogue`` + ``args``), user code
(``import: pkg.mod:fn`` + ``args``) or a Hugging Face config (``hf``). Each is resolved against
the spec's task: the catalogue and HF models know what they consume, so they fill the task's
defaults (vocab and seq_len, or input_shape and classes) and refuse a task they cannot serve;
imported models need the task spelled out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import ValidationError
from torch import nn

from trainplan.errors import SpecError
from trainplan.ir.base import Strict
from trainplan.ir.facts import TransformerFacts
from trainplan.ir.loading import _problems
from trainplan.ir.spec import ModelSpec, TaskSpec
from trainplan.models.bert import BertConfig, build_bert
from trainplan.models.cnn import CNNConfig, build_cnn
from trainplan.models.gpt import GPTConfig, build_gpt
from trainplan.models.hf import build_hf, hf_task
from trainplan.models.imported import build_imported, explicit_task
from trainplan.models.init import stable_seed
from trainplan.models.llama import LlamaConfig, build_llama
from trainplan.models.mlp import MLPConfig, build_mlp


class CatalogueEntry(NamedTuple):
    config: type[Strict]
    build: Callable[[Any], nn.Module]
    task_kind: str  # the task the model consumes: "lm" or "classification"


CATALOGUE: dict[str, CatalogueEntry] = {
    "gpt": CatalogueEntry(GPTConfig, build_gpt, "lm"),
    "llama": CatalogueEntry(LlamaConfig, build_llama, "lm"),
    "bert": CatalogueEntry(BertConfig, build_bert, "lm"),
    "mlp": CatalogueEntry(MLPConfig, build_mlp, "classification"),
    "cnn": CatalogueEntry(CNNConfig, build_cnn, "classification"),
}


@dataclass(frozen=True)
class BuiltModel:
    """A built module plus what the front end and runtime need to know about it."""

    module: nn.Module
    task: TaskSpec  # resolved: vocab/seq_len or input_shape/classes filled in
    facts: TransformerFacts | None


def catalogue_config(spec: ModelSpec) -> Strict:
    """Validate ``model.args`` against the catalogue entry's config (errors under model.args)."""
    if spec.catalogue not in CATALOGUE:
        known = ", ".join(sorted(CATALOGUE))
        raise SpecError([("model.catalogue", f"unknown model {spec.catalogue!r}; known: {known}")])
    entry = CATALOGUE[spec.catalogue]
    try:
        return entry.config.model_validate(spec.args)
    except ValidationError as exc:
        raise SpecError(_problems(entry.config, exc)).prefixed("model.args") from None


def resolve_task(spec: ModelSpec, task: TaskSpec) -> TaskSpec:
    """The task with defaults from the model filled in; mismatches are SpecErrors.

    A task whose ``kind`` was not written takes the model's kind (an ``mlp`` needs no
    ``task: {kind: classification}``); a written kind that the model cannot serve is an error.
    ``kind: import`` (a user dataset) passes through unchanged.
    """
    if spec.import_ is not None or spec.instance is not None:
        return explicit_task(task)
    if spec.hf is not None:
        sizes = hf_task(spec.hf)
        task = _adopt_kind(task, sizes.kind)
        if sizes.kind == "lm":
            return _resolve_lm_task(task, sizes.vocab or 0, sizes.seq_len or 0, limited=sizes.limited)
        return _resolve_classification_task(task, sizes)
    cfg = catalogue_config(spec)
    kind = CATALOGUE[spec.catalogue or ""].task_kind
    task = _adopt_kind(task, kind)
    if kind == "lm":
        facts = cfg.facts()  # type: ignore[attr-defined]
        return _resolve_lm_task(task, facts.vocab, facts.seq_len)
    return _resolve_classification_task(task, cfg)


def _adopt_kind(task: TaskSpec, kind: str) -> TaskSpec:
    if "kind" in task.model_fields_set or task.kind == kind:
        return task
    data = {**task.model_dump(exclude_unset=True, by_alias=True), "kind": kind}
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems(TaskSpec, exc)).prefixed("task") from None


def _kind_error(model_kind: str, task: TaskSpec) -> SpecError:
    what = "a language model" if model_kind == "lm" else "a classifier"
    return SpecError([("task.kind", f"this model is {what}; expected {model_kind!r}, got {task.kind!r} "
                       f"(remove task.kind or pick a model that consumes {task.kind!r} tasks)")])


def _resolve_lm_task(task: TaskSpec, vocab: int, seq_len: int, *, limited: bool = True) -> TaskSpec:
    """Fill vocab and seq_len; ``seq_len`` is the model's longest sequence, or only a default when not ``limited``."""
    if task.kind == "import":
        return task
    if task.kind != "lm":
        raise _kind_error("lm", task)
    problems = []
    if task.vocab is not None and task.vocab != vocab:
        problems.append(("task.vocab", f"the model's vocabulary is {vocab}, got {task.vocab}"))
    if limited and task.seq_len is not None and task.seq_len > seq_len:
        problems.append(("task.seq_len", f"the model supports at most {seq_len} positions, got {task.seq_len}"))
    if problems:
        raise SpecError(problems)
    return task.model_copy(update={"vocab": vocab, "seq_len": task.seq_len or seq_len})


def _resolve_classification_task(task: TaskSpec, cfg: Any) -> TaskSpec:
    if task.kind == "import":
        return task
    if task.kind != "classification":
        raise _kind_error("classification", task)
    problems = []
    if task.input_shape is not None:
        problem = cfg.input_problem(list(task.input_shape))
        if problem:
            problems.append(("task.input_shape", problem))
    if task.classes is not None and task.classes != cfg.classes:
        problems.append(("task.classes", f"the model has {cfg.classes} classes, got {task.classes}"))
    if problems:
        raise SpecError(problems)
    return task.model_copy(
        update={"input_shape": list(task.input_shape or cfg.sample_shape), "classes": cfg.classes}
    )


def build_model(
    spec: ModelSpec,
    task: TaskSpec | None = None,
    *,
    device: str | torch.device = "meta",
    base_dir: Path | None = None,
) -> BuiltModel:
    """Build the spec's model on ``device`` (``"meta"`` allocates nothing).

    ``base_dir`` is the spec's folder: an ``import`` model's module is looked for there first.
    """
    task = resolve_task(spec, task or TaskSpec())
    if spec.catalogue is not None:
        cfg = catalogue_config(spec)
        with torch.device(device):
            module = CATALOGUE[spec.catalogue].build(cfg)
        facts = cfg.facts() if hasattr(cfg, "facts") else None
        return BuiltModel(module, task, facts)
    if spec.hf is not None:
        module, facts = build_hf(spec.hf, device)
        return BuiltModel(module, task, facts)
    if spec.instance is not None:
        raise SpecError([("model.instance", f"this spec describes a model object ({spec.instance}) given to "
                          "trainplan.auto_parallelize in Python; it cannot be rebuilt from the spec: call "
                          "auto_parallelize(model, example_inputs, plan=plan) with that model")])
    module, facts = build_imported(spec, device, base_dir)
    if facts is not None and task.kind == "lm":
        _resolve_lm_task(task, facts.vocab, facts.seq_len)  # the declared facts must agree with the task
    return BuiltModel(module, task, facts)


def example_inputs(task: TaskSpec, batch: int, device: str | torch.device = "meta") -> tuple[torch.Tensor, ...]:
    """Inputs of one batch for a resolved task (token ids for lm, float samples otherwise)."""
    if task.kind == "lm":
        if task.seq_len is None or task.vocab is None:
            raise SpecError([("task", "an lm task needs vocab and seq_len (or a catalogue model that has them)")])
        return (torch.zeros(batch, task.seq_len, dtype=torch.long, device=device),)
    if task.kind == "classification":
        if task.input_shape is None:
            raise SpecError([("task.input_shape", "a classification task needs input_shape")])
        return (torch.zeros(batch, *task.input_shape, device=device),)
    raise SpecError([("task.kind", "import tasks provide their own inputs; not supported at plan time yet")])


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy (nats) of logits ``(B, S, V)`` against next tokens ``(B, S)``."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of logits ``(B, C)`` against class indices ``(B,)``."""
    return torch.nn.functional.cross_entropy(logits, targets)


def loss_fn(task: TaskSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of a task, a module-level function (picklable for worker processes)."""
    if task.kind == "lm":
        return lm_loss
    if task.kind == "classification":
        return classification_loss
    raise SpecError([("task.kind", "import tasks are not supported by the built-in losses yet; use 'lm' or 'classification'")])


MAX_STRIDE = 8  # largest step of the synthetic arithmetic token sequences


def synthetic_batch(
    task: TaskSpec, batch: int, seed: int, step: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of the global batch of ``step``: a function of (task, batch, seed, step) only.

    Drawn on the CPU from a generator seeded by SHA-256 of (seed, step), so every process makes
    the same global batch and data-parallel ranks take their rows of it. The data is learnable,
    so losses fall in a short run:

    * lm: each sample is an arithmetic sequence ``(start + stride*i) mod vocab`` with random start
      and stride in ``1..8``; targets are the inputs shifted by one token (next-token prediction);
    * classification: standard-normal samples labelled by the arg-max of a fixed random linear map
      (fixed per seed, the same at every step).
    """
    task = _checked_synthetic_task(task)
    generator = torch.Generator().manual_seed(stable_seed(seed, f"data:{step}"))
    if task.kind == "lm":
        inputs, targets = _arithmetic_tokens(task.vocab or 1, task.seq_len or 1, batch, generator)
    else:
        inputs = torch.randn(batch, *(task.input_shape or []), generator=generator)
        labeller = torch.Generator().manual_seed(stable_seed(seed, "data:labels"))
        weights = torch.randn(inputs[0].numel(), task.classes or 1, generator=labeller)
        targets = (inputs.flatten(1) @ weights).argmax(dim=1)
    return inputs.to(device), targets.to(device)


def _checked_synthetic_task(task: TaskSpec) -> TaskSpec:
    if task.kind == "lm" and task.vocab is not None and task.seq_len is not None:
        return task
    if task.kind == "classification" and task.input_shape is not None and task.classes is not None:
        return task
    raise SpecError([("task", f"synthetic data needs a resolved lm or classification task, got {task.kind!r} "
                      "with missing sizes; resolve it with resolve_task() first")])


def _arithmetic_tokens(
    vocab: int, seq_len: int, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, vocab, (batch, 1), generator=generator)
    strides = torch.randint(1, MAX_STRIDE + 1, (batch, 1), generator=generator)
    tokens = (starts + strides * torch.arange(seq_len + 1)) % vocab
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
