"""What the front end reads from the module tree before tracing.

* Layer stacks: ``nn.ModuleList`` containers, and ``nn.Sequential`` ones of two or more
  children, not nested in another stack. Their children are the *block instances* (``layers.0`` ..
  ``layers.95``), each a pipeline unit of its own.
* Block signatures: a digest of a module's class, parameter and buffer shapes, plain attributes
  and children, so structurally identical blocks are traced and costed once.
* Leaf modules (``model.leaf_modules``): class names or module paths the tracer keeps whole.
* Parameter names: the canonical (first) name of every parameter and its aliases, so weights
  shared between modules (a tied LM head) are one parameter.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from trainplan.errors import SpecError

# Attributes that only record where a layer sits in its stack (Hugging Face sets ``layer_idx``);
# they must not make otherwise identical blocks look different.
POSITION_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "idx", "index"})
_PLAIN = (bool, int, float, str, type(None))


def class_name(module: nn.Module) -> str:
    return type(module).__name__


def qualified_class(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def join(prefix: str, name: str) -> str:
    """Module path ``prefix.name`` where either part may be the root ('')."""
    if not prefix:
        return name
    return f"{prefix}.{name}" if name else prefix


def is_under(path: str, ancestor: str) -> bool:
    """``path`` is ``ancestor`` or a module inside it."""
    return not ancestor or path == ancestor or path.startswith(ancestor + ".")


def _is_stack(module: nn.Module) -> bool:
    """A ModuleList holds layers even when there is one; a Sequential of one module is a wrapper."""
    if isinstance(module, nn.ModuleList):
        return len(module) >= 1
    return isinstance(module, nn.Sequential) and len(module) >= 2


def block_paths(model: nn.Module, leaves: Iterable[str] = ()) -> tuple[str, ...]:
    """Children of the outermost layer stacks, in registration order; leaf modules are not searched."""
    keep_whole = set(leaves)
    found: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        if path in keep_whole:
            return
        if _is_stack(module):
            found.extend(join(path, name) for name, _ in module.named_children())
            return
        for name, child in module.named_children():
            visit(child, join(path, name))

    visit(model, "")
    return tuple(found)


def _plain_attrs(module: nn.Module) -> list[str]:
    out = []
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or key in POSITION_ATTRS:
            continue
        if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
            out.append(f"a:{key}={value!r}")
    return out


def module_signature(module: nn.Module, memo: dict[int, str] | None = None) -> str:
    """Hex digest of the module's structure: equal digests trace to the same graph and costs."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    parts = [qualified_class(module)] + _plain_attrs(module)
    parts += [f"p:{n}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}" for n, p in module.named_parameters(recurse=False)]
    parts += [f"b:{n}:{tuple(b.shape)}:{b.dtype}" for n, b in module.named_buffers(recurse=False)]
    parts += [f"c:{n}:{module_signature(c, memo)}" for n, c in module.named_children()]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    memo[id(module)] = digest
    return digest


def repeated_blocks(model: nn.Module, blocks: Sequence[str]) -> frozenset[str]:
    """Block instances whose signature at least one other instance shares."""
    memo: dict[int, str] = {}
    sigs = {p: module_signature(model.get_submodule(p), memo) for p in blocks}
    counts = Counter(sigs.values())
    return frozenset(p for p, s in sigs.items() if counts[s] >= 2)


def match_leaf_modules(model: nn.Module, leaf_modules: Sequence[str]) -> frozenset[str]:
    """Module paths named by ``leaf_modules`` (class names, qualified class names or paths).

    A leaf inside another leaf is dropped (the outer one is kept whole anyway). An entry that
    matches nothing is a :class:`SpecError` at ``model.leaf_modules[i]`` listing what exists.
    """
    modules = dict(model.named_modules())
    matched: set[str] = set()
    problems = []
    for i, entry in enumerate(leaf_modules):
        hits = {p for p, m in modules.items() if entry in (p, class_name(m), qualified_class(m)) and p}
        if not hits:
            classes = sorted({class_name(m) for m in modules.values()})
            problems.append((f"model.leaf_modules[{i}]", f"no module path or class named {entry!r} in this model; "
                             f"expected one of its classes ({', '.join(classes[:12])}) or a module path "
                             f"like {next(iter(p for p in modules if p), 'layers.0')!r}"))
        matched |= hits
    if problems:
        raise SpecError(problems)
    return frozenset(p for p in matched if not any(q != p and is_under(p, q) for q in matched))


@dataclass(frozen=True, slots=True)
class ParamTable:
    """Canonical names of a model's parameters: ``canonical[alias]`` and sizes by canonical name."""

    canonical: dict[str, str]
    numel: dict[str, int]
    nbytes: dict[str, int]
    aliases: dict[str, tuple[str, ...]]  # canonical -> every name of that parameter, canonical first

    def name(self, alias: str) -> str:
        return self.canonical.get(alias, alias)


def param_table(model: nn.Module) -> ParamTable:
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    canonical: dict[str, str] = {}
    numel: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        main = first.setdefault(id(p), name)
        canonical[name] = main
        aliases.setdefault(main, []).append(name)
        numel[main] = p.numel()
        nbytes[main] = p.numel() * p.element_size()
    return ParamTable(canonical, numel, nbytes, {k: tuple(v) for k, v in aliases.items()})
