"""Model catalogue and adapters: build any model of a spec on the meta device or on CPU.

``build_model(spec.model, device="meta")`` never allocates parameter memory on meta, so GPT-3
175B or a 1T model builds in seconds. Every failure of user input is a
:class:`~trainplan.errors.SpecError` naming the YAML path (``model.args.heads``).

For training, :func:`init_parameters` gives every parameter values that depend only on (seed,
name, shape), :func:`synthetic_batch` the same global batch in every process, and
:func:`loss_fn` the task's loss.
"""

from __future__ import annotations

from trainplan.models.init import init_parameter, init_parameters, materialize, retie, tied_names
from trainplan.models.registry import (
    CATALOGUE,
    BuiltModel,
    CatalogueEntry,
    build_model,
    catalogue_config,
    example_inputs,
    loss_fn,
    resolve_task,
    synthetic_batch,
)

__all__ = [
    "CATALOGUE",
    "BuiltModel",
    "CatalogueEntry",
    "build_model",
    "catalogue_config",
    "example_inputs",
    "init_parameter",
    "init_parameters",
    "loss_fn",
    "materialize",
    "resolve_task",
    "retie",
    "synthetic_batch",
    "tied_names",
]
