"""Library entry points. Thin: each is a composition of ir, models, passes and planner."""

from __future__ import annotations

from pathlib import Path

import torch

from trainplan.ir.graph import OpGraph
from trainplan.ir.loading import load, validate
from trainplan.ir.spec import Spec
from trainplan.models import build_model
from trainplan.passes import build_graph

COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; errors name the file and the YAML path."""
    return load(Spec, path)


def spec_from_dict(data: dict) -> Spec:
    return validate(Spec, data)


def trace(spec: Spec, base_dir: Path | None = None) -> OpGraph:
    """Build the spec's model on meta and run the front end (no real memory is allocated)."""
    built = build_model(spec.model, spec.task, device="meta", base_dir=base_dir)
    return build_graph(
        built,
        dtype=COMPUTE_DTYPE[spec.training.precision],
        leaf_modules=tuple(spec.model.leaf_modules),
    )
