"""GPT-3 175B and a 1T GPT traced on meta: closed forms of parameters and FLOPs, one block type."""

from __future__ import annotations

import pytest

from tests.passes import toys
from tests.passes.test_annotate import gpt_flops, megatron_params
from trainplan.passes import build_graph, verify

SIZES = {
    # Brown et al. 2020, Table 2.1 (GPT-3 175B); the 1T GPT of Narayanan et al. 2021, Table 1.
    "gpt3-175b": dict(layers=96, hidden=12288, heads=96, vocab=50257, seq_len=2048),
    "gpt-1t": dict(layers=128, hidden=25600, heads=160, vocab=51200, seq_len=2048),
}


@pytest.mark.parametrize("name", SIZES)
def test_huge_gpt_closed_forms(name: str) -> None:
    cfg = SIZES[name]
    layers, h, s, vocab = cfg["layers"], cfg["hidden"], cfg["seq_len"], cfg["vocab"]
    g = build_graph(toys.gpt(**cfg))
    verify(g)
    assert g.params == megatron_params(layers, h, vocab, s)
    assert (g.flops_fwd, g.flops_bwd) == gpt_flops(layers, h, vocab, s)
    per_token = (g.flops_fwd + g.flops_bwd) / s
    assert per_token == pytest.approx(6 * g.params + 12 * layers * h * s, rel=0.02)  # PaLM App. B
    assert [grp.label for grp in g.block_groups()] == ["embedding", f"layers.0-{layers - 1} ×{layers}", "head"]
    assert g.units[1].output_bytes == 4 * s * h
