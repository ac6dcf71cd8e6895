"""Linearisation: units in execution order, the bytes crossing each cut, tied parameters."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

from tests.passes import toys
from trainplan.passes import annotate, build_graph, capture, linearise, verify

S, H = 16, 64


@pytest.fixture(scope="module")
def gpt_graph():
    return build_graph(toys.gpt(layers=3, hidden=H, heads=4, vocab=100, seq_len=S))


def test_gpt_units_are_embedding_layers_head(gpt_graph) -> None:
    units = gpt_graph.units
    assert [(u.name, u.kind) for u in units] == [("embedding", "embedding"), ("layers.0", "block"),
                                                 ("layers.1", "block"), ("layers.2", "block"), ("head", "head")]
    assert units[0].modules == ("wte", "wpe", "drop")
    assert units[1].modules == ("layers.0",)
    assert units[-1].modules == ("ln_f", "lm_head")
    assert all(n.block == "layers.1" for n in gpt_graph.unit_nodes(units[2]))


def test_gpt_cuts_carry_the_residual_stream_and_the_last_the_logits(gpt_graph) -> None:
    assert [u.output_bytes for u in gpt_graph.units[:-1]] == [4 * S * H] * 4
    assert gpt_graph.units[-1].output_bytes == gpt_graph.output_bytes == 4 * S * 100


def test_gpt_tied_embedding_is_owned_by_the_embedding_and_shared_by_the_head(gpt_graph) -> None:
    emb, head = gpt_graph.unit("embedding"), gpt_graph.unit("head")
    assert gpt_graph.tied == (("wte.weight", "lm_head.weight"),)
    assert gpt_graph.tied_units == (("embedding", "head"),)
    assert emb.tied_params == ("wte.weight",) and head.shared_params == ("wte.weight",)
    assert head.shared_param_bytes == 4 * 100 * H
    assert emb.params == 100 * H + S * H and head.params == 2 * H  # the head owns only ln_f
    # Every cut between them separates the two holders of the tied table.
    assert [u.tied_bytes_after for u in gpt_graph.units] == [4 * 100 * H] * 4 + [0]


def test_skip_connection_crosses_every_cut_it_spans() -> None:
    width, layers = 16, 4
    g = build_graph(toys.classifier(toys.on_meta(toys.LongSkip, width, layers)))
    verify(g)
    assert [u.name for u in g.units] == ["stem", "layers.0", "layers.1", "layers.2", "layers.3", "head"]
    row = 4 * width  # one fp32 activation row of one sample
    # After the stem: the stem output (the stream and the skip are one value); after each block: the
    # block's output plus the skip still waiting; the root's `h + skip` runs right after the last
    # block and joins its unit, so that cut carries the sum alone.
    assert [u.output_bytes for u in g.units] == [row] + [2 * row] * (layers - 1) + [row, 4 * 2]
    assert [n.target for n in g.unit_nodes(g.unit("layers.3"))][-1] == "aten.add.Tensor"


def test_tied_weights_are_counted_once_and_synchronised() -> None:
    vocab, width = 32, 16
    g = build_graph(toys.tied_lm(vocab))
    verify(g)
    assert g.params == vocab * width + 2 * (width * width + width)  # embed (= out) + two residual layers
    assert g.tied == (("embed.weight", "out.weight"),)
    assert g.tied_units == (("embedding", "head"),)
    assert g.unit("head").params == 0 and g.unit("head").shared_param_bytes == 4 * vocab * width


def test_model_without_stacks_has_one_unit_per_child() -> None:
    g = build_graph(toys.classifier(toys.on_meta(toys.ThreeLinear)))
    assert [(u.name, u.kind, u.modules) for u in g.units] == [
        ("fc1", "other", ("fc1",)), ("fc2", "other", ("fc2",)), ("fc3", "other", ("fc3",))]
    # Root-level relu joins the unit before it: the cut after fc1 carries relu(fc1(x)).
    assert [n.target for n in g.unit_nodes(g.units[0])] == ["aten.linear.default", "aten.relu.default"]
    assert [u.output_bytes for u in g.units] == [4 * 16, 4 * 16, 4 * 2]


def test_hf_layers_read_the_mask_and_rotary_tables_across_every_cut() -> None:
    pytest.importorskip("transformers")
    from trainplan.ir.spec import HFModel, ModelSpec
    from trainplan.models import build_model

    cfg = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=100, max_position_embeddings=32)
    g = build_graph(build_model(ModelSpec(hf=HFModel(arch="llama", config=cfg)), device="meta"))
    verify(g)
    seq, hidden, head_dim = 32, 64, 16
    stream = 4 * seq * hidden
    rotary = 2 * 4 * seq * head_dim  # cos and sin, fp32
    # No mask crosses a cut: trainplan's HF wrapper runs sdpa's is_causal (trainplan.models.hf).
    assert [u.output_bytes for u in g.units[:-2]] == [stream + rotary] * 3
    assert g.units[-2].output_bytes == stream  # after the last layer nothing but the stream


def test_linearise_is_a_pure_function_of_the_graph() -> None:
    g = annotate(capture(toys.gpt(layers=2)))
    once, twice = linearise(g), linearise(g)
    assert once == twice and g.units == ()
    verify(once)


def test_bf16_cuts_are_half_of_fp32(gpt_graph) -> None:
    g16 = build_graph(toys.gpt(layers=3, hidden=H, heads=4, vocab=100, seq_len=S), dtype=torch.bfloat16)
    assert [u.output_bytes * 2 for u in g16.units] == [u.output_bytes for u in gpt_graph.units]


def test_graph_is_plain_data(gpt_graph) -> None:
    """No torch objects in the IR: it serialises as JSON and survives a round trip by value."""
    data = json.loads(json.dumps(dataclasses.asdict(gpt_graph)))
    assert data["units"][1]["name"] == "layers.0" and data["facts"]["hidden"] == H
    assert pickle.loads(pickle.dumps(gpt_graph)) == gpt_graph
