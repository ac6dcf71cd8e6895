"""Library entry points. Thin: each is a composition of ir, models, passes and planner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from trainplan.ir.graph import OpGraph
from trainplan.ir.loading import load, read_yaml, validate
from trainplan.ir.plan import Plan
from trainplan.ir.spec import Spec
from trainplan.models import build_model, resolve_task
from trainplan.passes import build_graph

COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; errors name the file and the YAML path."""
    return load(Spec, path)


def spec_from_dict(data: dict) -> Spec:
    return validate(Spec, data)


def resolve(spec: Spec) -> Spec:
    """The spec with its task's defaults filled in from the model (vocab, seq_len, shapes)."""
    return spec.model_copy(update={"task": resolve_task(spec.model, spec.task)})


def trace(spec: Spec, base_dir: Path | None = None) -> OpGraph:
    """Build the spec's model on meta and run the front end (no real memory is allocated)."""
    built = build_model(spec.model, spec.task, device="meta", base_dir=base_dir)
    return build_graph(
        built,
        dtype=COMPUTE_DTYPE[spec.training.precision],
        leaf_modules=tuple(spec.model.leaf_modules),
    )


def plan(
    spec: Spec, base_dir: Path | None = None, keep: int = 10, progress: Callable[[int, int], None] | None = None
) -> tuple[Plan, float]:
    """Trace the spec's model and search for the fastest plan that fits; (plan, search seconds)."""
    from trainplan.planner import plan_from_graph

    graph = trace(spec, base_dir)
    return plan_from_graph(resolve(spec), graph, keep, progress)


def load_plan(path: str | Path) -> Plan:
    return load(Plan, path)


def is_plan_file(path: str | Path) -> bool:
    """A saved plan has a ``spec_hash`` at the top level; a spec never does."""
    data = read_yaml(path)
    return isinstance(data, dict) and "spec_hash" in data
