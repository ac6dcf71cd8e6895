"""User-facing errors.

Every mistake a person can make in a spec, a plan or a command line surfaces as a
:class:`TrainplanError` whose message names what was declared, what was expected and, where we
know it, the fix. The CLI prints the message and exits non-zero; it never shows a traceback for
these.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class TrainplanError(Exception):
    """Base class of every error caused by user input (spec, plan, flags, model code)."""


class SpecError(TrainplanError):
    """A spec or plan file is invalid.

    ``problems`` holds ``(yaml_path, message)`` pairs, e.g. ``("parallel.tp", "expected 'auto'
    or a positive integer, got -2")``; ``source`` is the file they came from, if any.
    """

    def __init__(self, problems: Sequence[tuple[str, str]], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            path, msg = self.problems[0]
            return f"{where}{path}: {msg}" if path else f"{where}{msg}"
        lines = [f"{where}{len(self.problems)} problems:"]
        lines += [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in self.problems]
        return "\n".join(lines)

    def with_source(self, source: str) -> "SpecError":
        return SpecError(self.problems, source)

    def prefixed(self, prefix: str) -> "SpecError":
        """The same problems, their paths moved under ``prefix`` (e.g. ``model.args``)."""
        return SpecError([(join_path(prefix, p), m) for p, m in self.problems], self.source)


class TraceError(TrainplanError):
    """A model could not be captured as a graph; the message names the module/op and the fix."""


class PlanningError(TrainplanError):
    """No plan satisfies the spec; the message lists the closest candidates and what would fit."""


def join_path(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


def format_loc(loc: Iterable[object]) -> str:
    """Turn a pydantic error location ``('parallel', 'tp')`` into a YAML path ``parallel.tp``."""
    out = ""
    for part in loc:
        out = join_path(out, f"[{part}]" if isinstance(part, int) else str(part))
    return out
