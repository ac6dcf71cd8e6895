"""trainplan: a declarative training-plan compiler for PyTorch.

Library entry points (the CLI is a thin layer over the same functions)::

    import trainplan
    spec = trainplan.load_spec("plans/gpt3-175b-a100.yaml")
    plan = trainplan.plan(spec)            # trace on meta, search, return the Plan (nothing runs)

    # inside a torchrun script: plan for this process group and parallelise a model object
    plan, model = trainplan.auto_parallelize(my_model, (example_tokens,), training={"global_batch": 32})
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from trainplan.ir.plan import Plan
    from trainplan.ir.spec import Spec


def load_spec(path: str | Path) -> "Spec":
    """Read and validate a spec file (errors name the file and the YAML path)."""
    from trainplan import api

    return api.load_spec(path)


def plan(spec: "Spec | str | Path", keep: int = 10) -> "Plan":
    """The fastest plan that fits for ``spec`` (a Spec or a path to a spec file); nothing is executed."""
    from trainplan import api

    if isinstance(spec, (str, Path)):
        base = Path(spec).resolve().parent
        spec = api.load_spec(spec)
    else:
        base = None
    return api.plan(spec, base_dir=base, keep=keep)[0]


def auto_parallelize(model: Any, example_inputs: Any, **kwargs: Any) -> Any:
    """Plan ``model`` for the running process group and parallelise it; returns ``(plan, parallel_model)``.

    See :func:`trainplan.auto.auto_parallelize` for the arguments.
    """
    from trainplan.auto import auto_parallelize as _auto_parallelize

    return _auto_parallelize(model, example_inputs, **kwargs)


__all__ = ["__version__", "auto_parallelize", "load_spec", "plan"]
