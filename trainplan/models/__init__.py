"""Model catalogue and adapters: build any model of a spec on the meta device or on CPU.

``build_model(spec.model, device="meta")`` never allocates parameter memory on meta, so GPT-3
175B or a 1T model builds in seconds. Every failure of user input is a
:class:`~trainplan.errors.SpecError` naming the YAML path (``model.args.heads``).
"""

from __future__ import annotations

from trainplan.models.registry import (
    CATALOGUE,
    BuiltModel,
    build_model,
    example_inputs,
    resolve_task,
)

__all__ = ["CATALOGUE", "BuiltModel", "build_model", "example_inputs", "resolve_task"]
