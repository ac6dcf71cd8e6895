"""Capture: torch.export first, symbolic_trace as fallback, repeated blocks traced once, leaf modules."""

from __future__ import annotations

import pytest
import torch

from tests.passes import toys
from trainplan.errors import SpecError, TraceError
from trainplan.passes import build_graph, capture, verify
from trainplan.passes.opaque import OPAQUE_OP, OpaqueModule


def test_repeated_blocks_are_traced_once_and_kept_whole_outside() -> None:
    built = toys.gpt(layers=4)
    captured = capture(built)
    assert captured.outer.frontend == "torch.export"
    assert len(captured.blocks) == 1  # four identical layers, one block graph
    opaque = [n for n in captured.outer.gm.graph.nodes if n.target is OPAQUE_OP]
    assert [captured.outer.calls[n.name].path for n in opaque] == [f"layers.{i}" for i in range(4)]
    (block,) = captured.blocks.values()
    assert block.path == "layers.0" and block.frontend == "torch.export"
    assert sum("linear" in str(n.target) for n in block.gm.graph.nodes) == 6  # q, k, v, proj, fc, proj
    assert sum("linear" in str(n.target) for n in captured.outer.gm.graph.nodes) == 1  # the LM head


def test_capture_leaves_the_model_as_it_was() -> None:
    built = toys.gpt(layers=3)
    built.module.eval()
    before = dict(built.module.named_modules())
    capture(built)
    after = dict(built.module.named_modules())
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert not any(isinstance(m, OpaqueModule) for m in after.values())
    assert not any(m.training for m in after.values())  # eval mode restored after tracing in train mode


def test_outer_graph_does_not_lift_block_parameters() -> None:
    captured = capture(toys.gpt(layers=3))
    lifted = {name for kind, name, _ in captured.outer.state.values() if kind == "param"}
    assert lifted == {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}


def test_symbolic_trace_is_the_fallback_and_agrees_with_export() -> None:
    built = toys.gpt(layers=2)
    exported = build_graph(built)
    traced = build_graph(built, frontends=("torch.fx.symbolic_trace",))
    assert (exported.frontend, traced.frontend) == ("torch.export", "torch.fx.symbolic_trace")
    for field in ("params", "param_bytes", "flops_fwd", "flops_bwd", "output_bytes"):
        assert getattr(exported, field) == getattr(traced, field), field
    assert [u.activation_bytes for u in exported.units] == [u.activation_bytes for u in traced.units]
    assert [u.output_bytes for u in exported.units] == [u.output_bytes for u in traced.units]


def test_untraceable_model_names_module_and_line_and_suggests_leaf_modules() -> None:
    with pytest.raises(TraceError) as err:
        build_graph(toys.classifier(toys.on_meta(toys.Gated)))
    text = str(err.value)
    assert "module 'gate' (Gate)" in text
    assert "if x.sum() > 0:" in text and "toys.py" in text  # the failing source line
    assert "torch.export failed" in text and "torch.fx.symbolic_trace failed" in text
    assert "leaf_modules: [Gate]" in text and "['gate']" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("leaf", ["Gate", "gate", "tests.passes.toys.Gate"])
def test_leaf_module_kept_whole_makes_it_traceable(leaf: str) -> None:
    g = build_graph(toys.classifier(toys.on_meta(toys.Gated)), leaf_modules=[leaf])
    verify(g)
    (gate,) = [n for n in g.nodes if n.module_path == "gate"]
    assert (gate.op, gate.target) == ("call_module", "Gate")
    # Scalar reads are zero on meta, so the else branch (one 8x8 linear) is costed...
    assert gate.flops_fwd == 2 * 8 * 8
    # ...while both branches' parameters exist and are owned by the node.
    assert gate.params == 2 * (8 * 8 + 8)
    assert [u.name for u in g.units] == ["inp", "gate", "out"]


def test_leaf_module_through_the_symbolic_fallback() -> None:
    built = toys.classifier(toys.on_meta(toys.Gated))
    exported = build_graph(built, leaf_modules=["Gate"])
    traced = build_graph(built, leaf_modules=["Gate"], frontends=("torch.fx.symbolic_trace",))
    verify(traced)
    for field in ("params", "flops_fwd", "flops_bwd"):
        assert getattr(traced, field) == getattr(exported, field), field


def test_leaf_inside_a_repeated_block_keeps_costs() -> None:
    built = toys.gpt(layers=2)
    plain = build_graph(built)
    leafy = build_graph(built, leaf_modules=["MLP"])
    verify(leafy)
    assert (leafy.params, leafy.flops_fwd, leafy.flops_bwd) == (plain.params, plain.flops_fwd, plain.flops_bwd)
    mlps = [n for n in leafy.nodes if n.target == "MLP"]
    assert [n.module_path for n in mlps] == ["layers.0.mlp", "layers.1.mlp"]


def test_whole_blocks_as_leaves_keep_costs() -> None:
    built = toys.gpt(layers=2)
    plain = build_graph(built)
    leafy = build_graph(built, leaf_modules=["Block"])
    verify(leafy)
    assert (leafy.params, leafy.flops_fwd, leafy.flops_bwd) == (plain.params, plain.flops_fwd, plain.flops_bwd)
    assert [u.name for u in leafy.units] == [u.name for u in plain.units]


def test_unknown_leaf_module_is_a_spec_error_listing_classes() -> None:
    with pytest.raises(SpecError) as err:
        build_graph(toys.gpt(layers=1), leaf_modules=["Block", "Blok"])
    assert err.value.problems[0][0] == "model.leaf_modules[1]"
    assert "'Blok'" in str(err.value) and "CausalSelfAttention" in str(err.value)


def test_meta_model_stays_on_meta() -> None:
    built = toys.gpt(layers=1)
    capture(built)
    assert all(p.is_meta for p in built.module.parameters())
    assert torch.empty(0).device.type == "cpu"  # no default device left behind


class _NoMeta(torch.nn.Module):
    """``nonzero`` has no meta kernel: the model exports (on fake tensors) but cannot be costed on meta."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(x).float().sum() * x


def test_op_that_cannot_run_on_meta_is_a_trace_error() -> None:
    with pytest.raises(TraceError) as err:
        build_graph(toys.classifier(toys.on_meta(_NoMeta)))
    assert "could not cost aten.nonzero.default (graph node 'nonzero', module '<root>')" in str(err.value)
    assert "Traceback" not in str(err.value)
