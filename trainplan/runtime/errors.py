"""Errors of the runtime: a plan that cannot run here, and workers that failed.

Every one is a :class:`~trainplan.errors.TrainplanError`, so the CLI prints the message (what was
declared, what was found, the fix) and exits non-zero without a traceback.
"""

from __future__ import annotations

from trainplan.errors import TrainplanError


class PlanExecutionError(TrainplanError):
    """The plan cannot be executed as written (a module path, a style or a layout the model lacks)."""


class WorldSizeError(PlanExecutionError):
    """The number of launched processes differs from the plan's mesh (pp x dp x tp)."""


class WorkerFailedError(TrainplanError):
    """A worker process of a run failed; the message names the first rank that failed and why."""
