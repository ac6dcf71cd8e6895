"""The verifier: every pass's output satisfies it, and each check catches its broken invariant."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from tests.passes import toys
from trainplan.ir.graph import OpGraph
from trainplan.models import BuiltModel
from trainplan.passes import CHECKS, GraphInvariantError, annotate, capture, detect_blocks, linearise, verify

MODELS: dict[str, Callable[[], BuiltModel]] = {
    "gpt": lambda: toys.gpt(layers=3),
    "mlp": lambda: toys.catalogue("mlp", input_dim=12, hidden=16, layers=3, classes=4),
    "skip": lambda: toys.classifier(toys.on_meta(toys.LongSkip)),
    "tied": toys.tied_lm,
    "no-stack": lambda: toys.classifier(toys.on_meta(toys.ThreeLinear)),
}


@pytest.mark.parametrize("name", MODELS)
def test_verify_after_every_pass(name: str) -> None:
    annotated = annotate(capture(MODELS[name]()))
    verify(annotated)
    linear = linearise(annotated)
    verify(linear)
    typed = detect_blocks(linear)
    verify(typed)
    assert typed.units and all(u.block_type for u in typed.units)


@pytest.fixture(scope="module")
def good() -> OpGraph:
    return detect_blocks(linearise(annotate(capture(toys.gpt(layers=3)))))


def _node(g: OpGraph, i: int, **changes: object) -> OpGraph:
    nodes = list(g.nodes)
    nodes[i] = dataclasses.replace(nodes[i], **changes)
    return g.replace(nodes=tuple(nodes))


def _unit(g: OpGraph, i: int, **changes: object) -> OpGraph:
    units = list(g.units)
    units[i] = dataclasses.replace(units[i], **changes)
    return g.replace(units=tuple(units))


def _weight_node(g: OpGraph) -> int:
    return next(i for i, n in enumerate(g.nodes) if n.params)


BREAKAGES: list[tuple[str, Callable[[OpGraph], OpGraph]]] = [
    ("names are unique", lambda g: _node(g, 1, name=g.nodes[0].name)),
    ("edges point to earlier nodes or graph inputs", lambda g: _node(g, 1, inputs=(g.nodes[-1].name,))),
    ("node costs are non-negative", lambda g: _node(g, 0, flops_fwd=-1.0)),
    ("node fields are consistent", lambda g: _node(g, 1, activation_bytes=g.nodes[1].activation_bytes + 1)),
    ("each parameter is owned by its first reader, once", lambda g: g.replace(parameters=g.parameters[::-1])),
    ("each parameter is owned by its first reader, once", lambda g: _node(g, _weight_node(g), params=0)),
    ("graph totals equal the sums over nodes", lambda g: g.replace(flops_bwd=g.flops_bwd + 1)),
    ("units tile the nodes in execution order", lambda g: _unit(g, 1, first=g.units[1].first + 1)),
    ("unit costs equal the sums over their nodes", lambda g: _unit(g, 2, activation_bytes=1)),
    ("unit costs are non-negative", lambda g: _unit(g, 0, output_bytes=-4)),
    ("block instances lie within their units", lambda g: _unit(g, 2, modules=("layers.0",))),
    ("the last cut carries the model outputs", lambda g: _unit(g, -1, output_bytes=0)),
    ("the last cut carries the model outputs", lambda g: _unit(g, -1, tied_bytes_after=8)),
    ("shared and tied parameters name their owners", lambda g: g.replace(tied_units=(("head", "embedding"),))),
    ("units of one block type have equal costs", lambda g: _unit(g, 1, block_type=g.units[0].block_type)),
]


def test_every_check_has_a_breakage() -> None:
    assert {name for name, _ in BREAKAGES} == {name for name, _ in CHECKS}


@pytest.mark.parametrize(("check", "breakage"), BREAKAGES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BREAKAGES)])
def test_each_check_catches_its_breakage(good: OpGraph, check: str, breakage: Callable[[OpGraph], OpGraph]) -> None:
    verify(good)
    with pytest.raises(GraphInvariantError) as err:
        verify(breakage(good))
    assert check in str(err.value)
