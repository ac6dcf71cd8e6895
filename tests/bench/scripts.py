"""Import a ``bench/`` script as a module (the scripts are not a package) for the tests of its pure parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench(name: str, module_name: str | None = None) -> ModuleType:
    """``bench/NAME.py`` loaded (once per call) as ``module_name`` (default ``NAME``)."""
    module_name = module_name or name
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
