"""The catalogue and the single entry point that builds a spec's model."""

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
from trainplan.models.gpt import GPTConfig, build_gpt


class CatalogueEntry(NamedTuple):
    config: type[Strict]
    build: Callable[[Any], nn.Module]
    task_kind: str  # the task the model consumes: "lm" or "classification"


CATALOGUE: dict[str, CatalogueEntry] = {
    "gpt": CatalogueEntry(GPTConfig, build_gpt, "lm"),
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
    """The task with defaults from the model filled in; mismatches are SpecErrors."""
    if spec.catalogue is None:
        return task
    cfg = catalogue_config(spec)
    facts = cfg.facts() if hasattr(cfg, "facts") else None
    if facts is not None:
        return _resolve_lm_task(task, facts.vocab, facts.seq_len)
    return task


def _resolve_lm_task(task: TaskSpec, vocab: int, seq_len: int) -> TaskSpec:
    if task.kind != "lm":
        raise SpecError([("task.kind", f"this model is a language model; expected 'lm', got {task.kind!r}")])
    problems = []
    if task.vocab is not None and task.vocab != vocab:
        problems.append(("task.vocab", f"the model's vocabulary is {vocab}, got {task.vocab}"))
    if task.seq_len is not None and task.seq_len > seq_len:
        problems.append(("task.seq_len", f"the model supports at most {seq_len} positions, got {task.seq_len}"))
    if problems:
        raise SpecError(problems)
    return task.model_copy(update={"vocab": vocab, "seq_len": task.seq_len or seq_len})


def build_model(
    spec: ModelSpec,
    task: TaskSpec | None = None,
    *,
    device: str | torch.device = "meta",
    base_dir: Path | None = None,
) -> BuiltModel:
    """Build the spec's model on ``device`` (``"meta"`` allocates nothing)."""
    task = resolve_task(spec, task or TaskSpec())
    if spec.catalogue is not None:
        cfg = catalogue_config(spec)
        with torch.device(device):
            module = CATALOGUE[spec.catalogue].build(cfg)
        facts = cfg.facts() if hasattr(cfg, "facts") else None
        return BuiltModel(module, task, facts)
    raise SpecError([("model", "only catalogue models are supported so far")])


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
