"""What the runtime needs to know about a model's structure, read from the module tree.

A *block* is an element of an ``nn.ModuleList`` (a transformer layer, an MLP layer, a residual
block): the unit that activation recomputation checkpoints and FSDP shards on its own. A *norm*
is a LayerNorm or RMSNorm, the module sequence parallelism shards along the sequence.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)


def block_paths(model: nn.Module) -> list[str]:
    """Paths of every element of every ``ModuleList`` of ``model``, in registration order."""
    out: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            out += [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return out


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


def under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` itself or inside it (``layers.1.attn`` is under ``layers.1``, not ``layers.10``)."""
    return path == prefix or path.startswith(prefix + ".")


def match_paths(pattern: str, paths: Iterable[str]) -> list[str]:
    """Module paths equal to ``pattern`` or matching it as a glob per dotted atom (``layers.*.attn.q``)."""
    atoms = pattern.split(".")
    out = []
    for path in paths:
        parts = path.split(".")
        if len(parts) == len(atoms) and all(fnmatch.fnmatchcase(p, a) for p, a in zip(parts, atoms)):
            out.append(path)
    return out


def present(module: nn.Module, paths: Iterable[str]) -> list[str]:
    """Those of ``paths`` that name a submodule of ``module`` (a pipeline stage holds only some)."""
    names = {name for name, _ in module.named_modules()}
    return [p for p in paths if p in names]
