"""Load specs and plans from YAML/JSON and turn validation failures into YAML-path errors.

``yaml.safe_load`` only. Every failure is a :class:`~trainplan.errors.SpecError` naming the file,
the YAML path and what was expected.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from trainplan.errors import SpecError, format_loc

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML (or JSON) file, with a clear error for a missing file or bad syntax."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([("", f"no such file: {p} (expected a YAML file)")])
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([("", f"invalid YAML{where}: {problem}")], str(p)) from None
    except UnicodeDecodeError:
        raise SpecError([("", "not a text file (expected YAML)")], str(p)) from None


def validate(model: type[M], data: Any, source: str | None = None) -> M:
    """``model.model_validate(data)`` with errors as YAML paths."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise SpecError([("", f"expected a mapping at the top level, got {got}")], source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems(model, exc), source) from None


def load(model: type[M], path: str | Path) -> M:
    return validate(model, read_yaml(path), str(path))


def _problems(model: type[BaseModel], exc: ValidationError) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        raw = tuple(err["loc"])
        # The last element of an unknown-key error is the user's key, whatever it spells.
        loc = _clean_loc(raw[:-1]) + raw[-1:] if err["type"] == "extra_forbidden" and raw else _clean_loc(raw)
        path, message = _describe(model, loc, err)
        seen.setdefault(path, message)
    return sorted(seen.items())


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's union-branch markers (``'literal['auto']'``, ``'int'``, function names)."""
    return tuple(p for p in loc if isinstance(p, int) or not _is_branch_marker(str(p)))


def _is_branch_marker(part: str) -> bool:
    return part.startswith(("literal[", "function-", "lax-or-strict", "json-or-python")) or part in {
        "int",
        "str",
        "bool",
        "float",
        "dict[str,any]",
    }


def _describe(model: type[BaseModel], loc: tuple[Any, ...], err: dict[str, Any]) -> tuple[str, str]:
    kind = err["type"]
    path = format_loc(loc)
    if kind == "extra_forbidden":
        parent = format_loc(loc[:-1])
        key = str(loc[-1])
        allowed = _allowed_keys(model, loc[:-1])
        hint = ""
        close = difflib.get_close_matches(key, allowed, n=1)
        if close:
            hint = f"; did you mean {close[0]!r}?"
        where = f" in {parent}" if parent else ""
        listed = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return path, f"unknown key {key!r}{where}{hint}{listed}"
    if kind == "missing":
        return path, "required field is missing"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return path, msg[len(prefix) :]
    return path, f"{msg[0].lower()}{msg[1:]}, got {err.get('input')!r}"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema accepts at ``loc`` (aliases as users write them)."""
    current: Any = model
    for part in loc:
        current = _field_model(current, part)
        if current is None:
            return []
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return []
    return [f.alias or name for name, f in current.model_fields.items()]


def _field_model(model: Any, key: Any) -> Any:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return _unwrap(field.annotation)
    return None


def _unwrap(annotation: Any) -> Any:
    """The BaseModel inside ``X | None`` / ``Optional[X]`` annotations, else the annotation."""
    if get_origin(annotation) is None:
        return annotation
    for arg in get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def dump_yaml(model: BaseModel) -> str:
    """Deterministic YAML of a model (aliases, insertion order, no flow style)."""
    data = model.model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
