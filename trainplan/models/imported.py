"""Models from user code: ``model: {import: "pkg.mod:fn", args: {...}}``.

The module is imported with the spec's folder first on ``sys.path``; ``fn(**args)`` runs under
``torch.device(device)`` (so parameters land on meta at plan time) and must return an
``nn.Module``. A module may describe itself with a ``trainplan_facts()`` method returning
:class:`~trainplan.ir.facts.TransformerFacts`. Anything that goes wrong in user code becomes a
:class:`~trainplan.errors.SpecError` naming the spec path, the function and the message.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainplan.errors import SpecError
from trainplan.ir.facts import TransformerFacts
from trainplan.ir.spec import ModelSpec, TaskSpec

WHERE = "model.import"


@contextmanager
def _on_path(base_dir: Path | None) -> Iterator[None]:
    """``base_dir`` first on ``sys.path`` for the duration of an import, then as before."""
    entry = str(Path(base_dir).resolve()) if base_dir is not None else None
    added = entry is not None and entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def import_module(name: str, base_dir: Path | None) -> Any:
    """Import ``name``; a missing module or an error while importing it is a SpecError."""
    with _on_path(base_dir):
        # A module file written after the last import (a fresh spec folder) must be found.
        importlib.invalidate_caches()
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                raise SpecError([(WHERE, f"cannot import module {name!r} ({exc}); is it on the Python "
                                  "path or next to the spec?")]) from None
            raise SpecError([(WHERE, f"importing module {name!r} failed: {exc}; install the missing "
                              "package or fix the import in that module")]) from None
        except Exception as exc:  # user code: any failure is reported, never a traceback
            raise SpecError([(WHERE, f"importing module {name!r} raised {type(exc).__name__}: {exc}")]) from None


def load_function(path: str, base_dir: Path | None) -> Callable[..., Any]:
    """The callable named by ``'pkg.mod:fn'`` (a dotted ``fn`` reaches into classes or objects)."""
    module_name, attr = path.split(":")
    target: Any = import_module(module_name, base_dir)
    for part in attr.split("."):
        if not hasattr(target, part):
            known = sorted(n for n, v in vars(target).items() if callable(v) and not n.startswith("_"))
            listed = ", ".join(known) if known else "none"
            raise SpecError([(WHERE, f"module {module_name!r} has no function {attr!r} "
                              f"(callables defined there: {listed})")])
        target = getattr(target, part)
    if not callable(target):
        raise SpecError([(WHERE, f"{path!r} is a {type(target).__name__}, expected a function returning an nn.Module")])
    return target


def _check_args(fn: Callable[..., Any], path: str, args: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: the call itself will tell
    try:
        signature.bind(**args)
    except TypeError as exc:
        raise SpecError([("model.args", f"{exc} for {path!r}, whose parameters are {signature}")]) from None


def call_builder(fn: Callable[..., Any], path: str, args: dict[str, Any], device: str | torch.device) -> nn.Module:
    """``fn(**args)`` under ``torch.device(device)``; it must return an ``nn.Module``."""
    _check_args(fn, path, args)
    try:
        with torch.device(device):
            module = fn(**args)
    except Exception as exc:  # user code: report which function failed and why
        raise SpecError([(WHERE, f"{path!r} raised {type(exc).__name__}: {exc}")]) from None
    if not isinstance(module, nn.Module):
        raise SpecError([(WHERE, f"{path!r} returned {type(module).__name__}, expected a torch.nn.Module")])
    return module


def declared_facts(module: nn.Module, path: str) -> TransformerFacts | None:
    """The module's ``trainplan_facts()``, if it defines one."""
    method = getattr(module, "trainplan_facts", None)
    if method is None:
        return None
    try:
        facts = method()
    except Exception as exc:  # user code
        raise SpecError([(WHERE, f"trainplan_facts() of {path!r} raised {type(exc).__name__}: {exc}")]) from None
    if not isinstance(facts, TransformerFacts):
        raise SpecError([(WHERE, f"trainplan_facts() of {path!r} returned {type(facts).__name__}, "
                          "expected trainplan.ir.facts.TransformerFacts")])
    return facts


def build_imported(
    spec: ModelSpec, device: str | torch.device, base_dir: Path | None
) -> tuple[nn.Module, TransformerFacts | None]:
    """Import, call and check the spec's ``import`` function."""
    if spec.import_ is None:
        raise SpecError([(WHERE, "expected 'package.module:function'")])
    fn = load_function(spec.import_, base_dir)
    module = call_builder(fn, spec.import_, spec.args, device)
    return module, declared_facts(module, spec.import_)


def explicit_task(task: TaskSpec) -> TaskSpec:
    """An imported model cannot say what it consumes, so the task must be complete."""
    if task.kind == "lm":
        missing = [f"task.{k}" for k in ("vocab", "seq_len") if getattr(task, k) is None]
        fix = "give them, e.g. task: {kind: lm, vocab: 50257, seq_len: 1024}"
    elif task.kind == "classification":
        missing = [f"task.{k}" for k in ("input_shape", "classes") if getattr(task, k) is None]
        fix = "give them, e.g. task: {kind: classification, input_shape: [3, 32, 32], classes: 10}"
    else:
        return task
    if missing:
        raise SpecError([(path, f"an imported model needs the task spelled out; {fix}") for path in missing])
    return task
