"""The OpGraph IR as plain data: frozen, tuple-valued, grouped for display."""

from __future__ import annotations

import dataclasses

import pytest

from trainplan.ir.graph import (BlockGroup, OpGraph, OpNode, ParamInfo, TensorValue, Unit, saved_keys_before,
                                unit_activation_bytes)


def node(name: str, saved: tuple[tuple[str, int], ...] = (), **kw: object) -> OpNode:
    fields = dict(op="call_function", target="aten.mm.default", module_path="", inputs=(), shapes=((2, 2),),
                  dtypes=("float32",), flops_fwd=16.0, flops_bwd=32.0, param_names=(), params=0, param_bytes=0,
                  saved=saved, activation_bytes=sum(b for _, b in saved), output_bytes=16)
    fields.update(kw)
    return OpNode(name=name, **fields)  # type: ignore[arg-type]


def unit(name: str, first: int, stop: int, block_type: str = "", kind: str = "block") -> Unit:
    return Unit(name=name, kind=kind, modules=(name,), block_type=block_type,  # type: ignore[arg-type]
                first=first, stop=stop, params=0, param_bytes=0, tied_params=(), shared_params=(),
                shared_param_bytes=0, flops_fwd=16.0, flops_bwd=32.0, activation_bytes=0, output_bytes=16)


def graph(units: tuple[Unit, ...] = (), n: int = 3) -> OpGraph:
    nodes = tuple(node(f"n{i}") for i in range(n))
    return OpGraph(nodes=nodes, inputs=(TensorValue("input:0", (2,), "int64", 16),), outputs=(nodes[-1].name,),
                   output_bytes=16, block_paths=(), module_classes=(("", "Net"),), dtype="float32", dtype_bytes=4,
                   frontend="torch.export", params=0, param_bytes=0, flops_fwd=16.0 * n, flops_bwd=32.0 * n,
                   units=units)


@pytest.mark.parametrize("obj", [node("a"), unit("u", 0, 1), graph(), TensorValue("x", (1,), "int64", 8),
                                 ParamInfo("w", ("w",), 4, 16), BlockGroup("t", 0, 1, "u", "u")])
def test_every_ir_class_is_frozen_and_slotted(obj: object) -> None:
    field = dataclasses.fields(obj)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, None)
    assert not hasattr(obj, "__dict__")  # slots: no per-instance attribute dictionary


def test_sequence_fields_are_tuples() -> None:
    g = graph((unit("layers.0", 0, 3),))
    for value in (g.nodes, g.inputs, g.outputs, g.units, g.tied, g.tied_units, g.nodes[0].shapes, g.units[0].modules):
        assert isinstance(value, tuple)


def test_replace_returns_a_new_graph_and_leaves_the_old_one() -> None:
    g = graph()
    h = g.replace(dtype="bfloat16", dtype_bytes=2)
    assert (g.dtype, h.dtype, h.nodes) == ("float32", "bfloat16", g.nodes)


def test_unit_activation_bytes_counts_each_saved_value_once() -> None:
    # q, k and v projections all save the same input: it is held once.
    nodes = [node("q", (("ln", 100),)), node("k", (("ln", 100),)), node("v", (("ln", 100), ("v#1", 7)))]
    assert unit_activation_bytes(nodes) == 107
    assert sum(n.activation_bytes for n in nodes) == 307


def test_a_value_saved_by_an_earlier_unit_is_not_counted_again() -> None:
    # relu saves its output; the next unit's conv saves it as its input: one storage, counted first.
    nodes = [node("conv", (("input:0", 12),)), node("relu", (("relu", 64),)),
             node("conv_1", (("relu", 64),)), node("relu_1", (("relu_1", 64),)), node("linear", (("relu_1", 64),))]
    spans = [(0, 2), (2, 4), (4, 5)]
    earlier = saved_keys_before(nodes, spans)
    assert earlier == [frozenset(), frozenset({"input:0", "relu"}), frozenset({"input:0", "relu", "relu_1"})]
    counted = [unit_activation_bytes(nodes[a:b], e) for (a, b), e in zip(spans, earlier)]
    assert counted == [76, 64, 0]
    assert sum(counted) == unit_activation_bytes(nodes) == 12 + 64 + 64


def test_block_groups_join_consecutive_units_of_one_type() -> None:
    units = (unit("embedding", 0, 1, "emb:1", "embedding"), unit("layers.0", 1, 2, "Block:a"),
             unit("layers.1", 2, 3, "Block:a"), unit("layers.2", 3, 4, "Block:a"), unit("head", 4, 5, "head:2", "head"))
    groups = graph(units, n=5).block_groups()
    assert [(g.first, g.count) for g in groups] == [(0, 1), (1, 3), (4, 1)]
    assert [g.label for g in groups] == ["embedding", "layers.0-2 ×3", "head"]


def test_block_groups_do_not_join_untyped_or_different_units() -> None:
    units = (unit("a", 0, 1), unit("b", 1, 2), unit("c", 2, 3, "X:1"), unit("d", 3, 4, "X:2"))
    assert [g.count for g in graph(units, n=4).block_groups()] == [1, 1, 1, 1]


def test_group_label_of_unnumbered_units() -> None:
    assert BlockGroup("t", 0, 2, "enc", "dec").label == "enc..dec ×2"


def test_unit_lookup_and_nodes() -> None:
    g = graph((unit("a", 0, 2), unit("b", 2, 3)))
    assert g.unit("b").first == 2
    assert [n.name for n in g.unit_nodes(g.unit("a"))] == ["n0", "n1"]
    assert g.units[0].flops == 48.0
    with pytest.raises(KeyError, match="no unit named 'zz'"):
        g.unit("zz")
