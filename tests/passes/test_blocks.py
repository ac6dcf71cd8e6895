"""Block types: identical repeated blocks share one; different ones do not."""

from __future__ import annotations

import dataclasses

from tests.passes import toys
from trainplan.passes import annotate, build_graph, capture, detect_blocks, linearise, verify
from trainplan.passes.modules import block_paths, module_signature, repeated_blocks


def test_identical_layers_share_a_type_named_after_their_class() -> None:
    g = build_graph(toys.gpt(layers=4))
    types = {u.block_type for u in g.units if u.kind == "block"}
    assert len(types) == 1 and next(iter(types)).startswith("Block:")
    assert [grp.label for grp in g.block_groups()] == ["embedding", "layers.0-3 ×4", "head"]
    assert g.unit("embedding").block_type != g.unit("head").block_type


def test_different_layers_get_different_types() -> None:
    # The first MLP layer maps 20 features to 32, the others 32 to 32.
    g = build_graph(toys.catalogue("mlp", input_dim=20, hidden=32, layers=4, classes=5))
    verify(g)
    assert [grp.label for grp in g.block_groups()] == ["layers.0", "layers.1-3 ×3", "head"]


def test_types_are_independent_of_position_and_of_the_run() -> None:
    a = build_graph(toys.gpt(layers=2))
    b = build_graph(toys.gpt(layers=5))
    assert a.unit("layers.0").block_type == b.unit("layers.4").block_type


def test_module_signatures_ignore_the_layer_index_attribute() -> None:
    built = toys.gpt(layers=3)
    for i, layer in enumerate(built.module.layers):
        layer.layer_idx = i  # as Hugging Face layers carry
    memo: dict[int, str] = {}
    assert len({module_signature(layer, memo) for layer in built.module.layers}) == 1
    built.module.layers[2].attn.dropout = 0.5  # a real difference
    assert module_signature(built.module.layers[2]) != module_signature(built.module.layers[0])
    assert repeated_blocks(built.module, block_paths(built.module)) == frozenset({"layers.0", "layers.1"})


def test_blocks_pass_only_adds_types() -> None:
    g = linearise(annotate(capture(toys.gpt(layers=2))))
    typed = detect_blocks(g)
    verify(typed)
    assert all(u.block_type == "" for u in g.units) and all(u.block_type for u in typed.units)
    untyped = [dataclasses.replace(u, block_type="") for u in typed.units]
    assert untyped == list(g.units)
    assert typed.nodes == g.nodes
