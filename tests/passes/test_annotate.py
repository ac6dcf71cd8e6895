"""Annotation: exact FLOPs, parameters and saved-activation bytes against closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from tests.passes import toys
from trainplan.passes import annotate, build_graph, capture, verify
from trainplan.passes.standins import flash_attention, flop_counter

L, H, A, V, S = 2, 64, 4, 100, 16  # layers, hidden, heads, vocab, sequence


def megatron_params(layers: int, hidden: int, vocab: int, seq: int) -> int:
    """Narayanan et al. 2021, Eq. 2: 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h)), plus 2h for ln_f."""
    return 12 * layers * hidden**2 + 13 * layers * hidden + (vocab + seq) * hidden + 2 * hidden


def gpt_flops(layers: int, h: int, vocab: int, s: int) -> tuple[int, int]:
    """Matmul FLOPs of one sample (multiply-add = 2), flash attention.

    Per layer forward: q, k, v, proj 4·2sh² + MLP 2·2s·h·4h = 24sh², attention QKᵀ and PV 4s²h;
    backward: twice the linears (input and weight gradients) and 5 attention matmuls (10s²h,
    FlashAttention recomputes the scores). LM head: 2shV forward, 4shV backward.
    """
    fwd = layers * (24 * s * h * h + 4 * s * s * h) + 2 * s * h * vocab
    bwd = layers * (48 * s * h * h + 10 * s * s * h) + 4 * s * h * vocab
    return fwd, bwd


@pytest.fixture(scope="module")
def gpt_graph():
    return build_graph(toys.gpt(layers=L, hidden=H, heads=A, vocab=V, seq_len=S))


def test_gpt_parameters_are_megatron_eq2_plus_final_layernorm(gpt_graph) -> None:
    assert gpt_graph.params == megatron_params(L, H, V, S)
    assert gpt_graph.param_bytes == 4 * gpt_graph.params
    assert gpt_graph.unused_params == ()


def test_untied_gpt_counts_the_head_separately() -> None:
    g = build_graph(toys.gpt(layers=1, hidden=32, heads=2, vocab=50, seq_len=8, tie_embeddings=False))
    assert g.params == megatron_params(1, 32, 50, 8) + 50 * 32
    assert g.tied == ()


def test_gpt_flops_match_the_closed_form_exactly(gpt_graph) -> None:
    fwd, bwd = gpt_flops(L, H, V, S)
    assert (gpt_graph.flops_fwd, gpt_graph.flops_bwd) == (fwd, bwd)


def test_gpt_flops_per_token_near_palm_appendix_b() -> None:
    """6N + 12·L·h·s (Chowdhery et al. 2022, App. B) within 2% at a realistic width/sequence ratio."""
    layers, h, s, vocab = 2, 512, 128, 1000
    g = build_graph(toys.gpt(layers=layers, hidden=h, heads=8, vocab=vocab, seq_len=s))
    per_token = (g.flops_fwd + g.flops_bwd) / s
    palm = 6 * g.params + 12 * layers * h * s
    assert per_token == pytest.approx(palm, rel=0.02)


def test_sdpa_is_counted_with_the_registered_flash_formulas() -> None:
    seq, hidden, heads = 12, 16, 2
    g = build_graph(toys.attention(seq, hidden, heads))
    (node,) = [n for n in g.nodes if "scaled_dot_product_attention" in n.target]
    shape = (1, heads, seq, hidden // heads)
    assert node.flops_fwd == sdpa_flop_count(shape, shape, shape) == 4 * seq * seq * hidden
    assert node.flops_bwd == sdpa_backward_flop_count(shape, shape, shape, shape) == 10 * seq * seq * hidden


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_flash_attention_is_counted_on_meta_and_cpu(device: str) -> None:
    """On CPU, SDPA runs an op torch's FlopCounterMode has no formula for; ours counts it."""
    q = torch.randn(1, 2, 8, 4, device=device, requires_grad=True)
    counter = flop_counter()
    with counter:
        out = flash_attention(q, q, q, is_causal=True)
    assert counter.get_total_flops() == sdpa_flop_count(q.shape, q.shape, q.shape)
    with counter:
        out.sum().backward()
    assert counter.get_total_flops() == sdpa_backward_flop_count(q.shape, q.shape, q.shape, q.shape)
    if device == "cpu":
        reference = F.scaled_dot_product_attention(q.detach(), q.detach(), q.detach(), is_causal=True)
        assert torch.allclose(out.detach(), reference, atol=1e-6)


def test_flash_attention_takes_grouped_query_heads() -> None:
    q = torch.empty(1, 4, 8, 4, device="meta")
    kv = torch.empty(1, 2, 8, 4, device="meta")
    counter = flop_counter()
    with counter:
        out = flash_attention(q, kv, kv, enable_gqa=True)
    assert out.shape == q.shape and counter.get_total_flops() == sdpa_flop_count(q.shape, q.shape, q.shape)


def test_gpt_block_saves_what_flash_training_keeps(gpt_graph) -> None:
    """Per layer: LN1 in/out, q, k, v, attention out, LN2 in/out, fc out, gelu out = 16sh values,
    plus LayerNorm mean and rstd (2 per token per LN) and the attention log-sum-exp (a per token)."""
    block = gpt_graph.unit("layers.1")
    assert block.activation_bytes == 4 * (16 * S * H + 4 * S + A * S)


def test_activation_bytes_follow_the_compute_dtype() -> None:
    built = toys.gpt(layers=L, hidden=H, heads=A, vocab=V, seq_len=S)
    g32 = build_graph(built)
    g16 = build_graph(built, dtype=torch.bfloat16)
    assert (g16.dtype, g16.dtype_bytes) == ("bfloat16", 2)
    assert g16.unit("layers.0").activation_bytes * 2 == g32.unit("layers.0").activation_bytes
    # Token ids stay int64 whatever the compute dtype: the embedding saves them at 8 bytes each.
    assert g16.unit("embedding").activation_bytes == g32.unit("embedding").activation_bytes == 8 * S * 2
    assert g16.param_bytes == g32.param_bytes  # fp32 master weights


def test_dropout_saves_one_byte_masks() -> None:
    dropped = build_graph(toys.gpt(layers=1, hidden=H, heads=A, vocab=V, seq_len=S, dropout=0.1), dtype=torch.bfloat16)
    plain = build_graph(toys.gpt(layers=1, hidden=H, heads=A, vocab=V, seq_len=S), dtype=torch.bfloat16)
    # Two dropouts per block (after attention and after the MLP), a bool mask each; flash keeps none.
    assert dropped.unit("layers.0").activation_bytes - plain.unit("layers.0").activation_bytes == 2 * S * H
    # The embedding dropout's mask.
    assert dropped.unit("embedding").activation_bytes - plain.unit("embedding").activation_bytes == S * H


def test_first_layer_on_raw_data_has_no_input_gradient() -> None:
    g = build_graph(toys.classifier(toys.on_meta(toys.ThreeLinear)))
    first, second = g.nodes[0], [n for n in g.nodes if n.module_path == "fc2"][0]
    assert first.flops_bwd == first.flops_fwd  # weight gradient only
    assert second.flops_bwd == 2 * second.flops_fwd


def test_annotate_is_deterministic() -> None:
    built = toys.gpt(layers=2)
    assert build_graph(built) == build_graph(built)


def test_each_pass_output_verifies() -> None:
    g = annotate(capture(toys.gpt(layers=2)))
    verify(g)
    assert g.units == () and g.params == megatron_params(2, 64, 100, 16)
