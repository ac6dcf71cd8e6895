"""Memory model: ZeRO Table 1, Korthikanti Table 2, in-flight micro-batches, per-stage breakdown."""

from __future__ import annotations

import csv
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainplan.ir.facts import TransformerFacts
from trainplan.planner.cost import memory as mem
from trainplan.planner.schedule import build, peak_in_flight

DATA = Path(__file__).resolve().parents[2] / "bench" / "data"
GB = 1e9  # the ZeRO paper's GB


def read_csv(name: str) -> list[dict[str, str]]:
    with open(DATA / name) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def gpt(layers: int = 24, hidden: int = 1024, heads: int = 16, seq: int = 2048, vocab: int = 51200) -> TransformerFacts:
    return TransformerFacts(
        kind="decoder", layers=layers, hidden=hidden, heads=heads, kv_heads=heads, ffn_hidden=4 * hidden,
        vocab=vocab, seq_len=seq, tied_embeddings=True,
    )


def quantize(value: float, printed: str, rounding: str) -> Decimal:
    """``value`` at the precision ``printed`` shows (its number of decimals)."""
    return Decimal(repr(value)).quantize(Decimal(printed), rounding=rounding)


ZERO_COLUMNS = {1: "zero1_pos_gb", 2: "zero2_pos_g_gb", 3: "zero3_pos_g_p_gb"}


def zero_gb(row: dict[str, str], stage: int) -> float:
    psi = float(row["params_billion"]) * 1e9
    return mem.model_state_bytes(psi, stage, int(row["dp_degree"]), "bf16", "adam").total / GB


def test_zero_table1_7_5b_rows_exactly_as_printed() -> None:
    rows = [r for r in read_csv("zero_sc20_table1.csv") if r["params_billion"] == "7.5"]
    assert [int(r["dp_degree"]) for r in rows] == [1, 4, 16, 64, 256, 1024]
    for row in rows:
        for stage, column in ZERO_COLUMNS.items():
            ours = quantize(zero_gb(row, stage), row[column], ROUND_HALF_UP)
            assert ours == Decimal(row[column]), (row, stage, zero_gb(row, stage))


def test_zero_table1_larger_models_match_rounded_or_truncated() -> None:
    # The 128B and 1T rows print some values truncated (e.g. 513.5 -> 513), the 7.5B rows rounded.
    rows = [r for r in read_csv("zero_sc20_table1.csv") if r["params_billion"] != "7.5"]
    assert len(rows) == 12
    for row in rows:
        for stage, column in ZERO_COLUMNS.items():
            ours = zero_gb(row, stage)
            printed = Decimal(row[column])
            assert printed in (quantize(ours, row[column], ROUND_HALF_UP), quantize(ours, row[column], ROUND_DOWN))


def test_zero_baseline_is_16_bytes_per_parameter() -> None:
    parts = mem.model_state_bytes(7.5e9, 0, 64, "bf16", "adam")
    assert (parts.params, parts.grads, parts.optimizer) == (2 * 7.5e9, 2 * 7.5e9, 12 * 7.5e9)
    assert parts.total == 120e9


@pytest.mark.parametrize(
    ("precision", "optimizer", "expected"),
    [("bf16", "adam", (2, 2, 12)), ("fp16", "adamw", (2, 2, 12)), ("fp32", "adam", (4, 4, 8)),
     ("fp32", "sgd", (4, 4, 0)), ("bf16", "sgd", (2, 2, 4))],
)
def test_state_bytes_per_param(precision: str, optimizer: str, expected: tuple[int, int, int]) -> None:
    assert mem.state_bytes_per_param(precision, optimizer) == expected  # type: ignore[arg-type]


def test_model_state_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="ZeRO stage"):
        mem.model_state_bytes(1e9, 4, 8, "bf16", "adam")
    with pytest.raises(ValueError, match="data-parallel"):
        mem.model_state_bytes(1e9, 1, 0, "bf16", "adam")
    with pytest.raises(ValueError, match="precision"):
        mem.model_state_bytes(1e9, 1, 2, "int8", "adam")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(params=st.floats(1, 1e13), dp=st.integers(1, 4096), stage=st.integers(0, 2),
       opt=st.sampled_from(["sgd", "adam"]), prec=st.sampled_from(["fp32", "bf16"]))
def test_model_state_monotone_in_zero_stage_and_dp(params: float, dp: int, stage: int, opt: str, prec: str) -> None:
    now = mem.model_state_bytes(params, stage, dp, prec, opt).total  # type: ignore[arg-type]
    assert mem.model_state_bytes(params, stage + 1, dp, prec, opt).total <= now  # type: ignore[arg-type]
    assert mem.model_state_bytes(params, stage, dp + 1, prec, opt).total <= now  # type: ignore[arg-type]


# ------------------------------------------------------------------ Korthikanti et al. 2022, Table 2


def table2(f: TransformerFacts, b: int, t: int, row: str) -> float:
    """Table 2 of Korthikanti et al. 2022 as printed (per layer, 16-bit activations)."""
    s, h, a = f.seq_len, f.hidden, f.heads
    sbh = s * b * h
    return {
        "none": sbh * (34 + 5 * a * s / h),
        "tp": sbh * (10 + 24 / t + 5 * a * s / (h * t)),
        "tp+sp": sbh / t * (34 + 5 * a * s / h),
        "tp+selective": sbh * (10 + 24 / t),
        "tp+sp+selective": sbh / t * 34,
        "full": sbh * 2,
    }[row]


@settings(max_examples=40, deadline=None)
@given(heads=st.sampled_from([8, 16, 32, 96]), head_dim=st.sampled_from([64, 128]), seq=st.sampled_from([512, 2048]),
       b=st.integers(1, 8), t=st.sampled_from([1, 2, 4, 8]))
def test_layer_activations_equal_korthikanti_table2(heads: int, head_dim: int, seq: int, b: int, t: int) -> None:
    f = gpt(hidden=heads * head_dim, heads=heads, seq=seq)
    act = mem.transformer_layer_activation_bytes
    assert act(f, b, 1, False, "none", 2) == pytest.approx(table2(f, b, 1, "none"), rel=1e-12)
    assert act(f, b, t, False, "none", 2) == pytest.approx(table2(f, b, t, "tp"), rel=1e-12)
    assert act(f, b, t, True, "none", 2) == pytest.approx(table2(f, b, t, "tp+sp"), rel=1e-12)
    assert act(f, b, t, False, "selective", 2) == pytest.approx(table2(f, b, t, "tp+selective"), rel=1e-12)
    assert act(f, b, t, True, "selective", 2) == pytest.approx(table2(f, b, t, "tp+sp+selective"), rel=1e-12)
    assert act(f, b, t, False, "full", 2) == pytest.approx(table2(f, b, t, "full"), rel=1e-12)
    assert act(f, b, t, True, "full", 2) == pytest.approx(table2(f, b, t, "full") / t, rel=1e-12)


def test_gpt3_layer_activations_in_gib() -> None:
    # GPT-3 175B, b=1, t=8 with SP and selective recompute: 34·s·b·h/t = 34·2048·12288/8 bytes.
    f = gpt(layers=96, hidden=12288, heads=96)
    got = mem.transformer_layer_activation_bytes(f, 1, 8, True, "selective", 2)
    assert got == 34 * 2048 * 12288 / 8 == 106_954_752


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 16), t=st.sampled_from([1, 2, 4, 8]), sp=st.booleans(), beta=st.sampled_from([2, 4]))
def test_activations_monotone(b: int, t: int, sp: bool, beta: int) -> None:
    f = gpt(hidden=2048, heads=16, seq=1024)
    act = mem.transformer_layer_activation_bytes
    none, sel, full = (act(f, b, t, sp, r, beta) for r in ("none", "selective", "full"))
    assert none >= sel >= full > 0
    assert act(f, b + 1, t, sp, "none", beta) > none
    if t < 8:
        assert act(f, b, 2 * t, sp, "none", beta) <= none
    assert act(f, b, t, True, "none", beta) <= act(f, b, t, False, "none", beta)


def test_gqa_and_gated_mlp_change_the_sharded_term() -> None:
    mha = gpt(hidden=4096, heads=32)
    gqa = TransformerFacts("decoder", 32, 4096, 32, 8, 11008, 32000, 2048, False, gated_mlp=True, learned_positions=False)
    # sharded: Q, K, V, out-proj (sbh + 2·s·b·h_kv + sbh) and three s·b·f tensors, at β bytes each.
    s, b, h, beta = 2048, 1, 4096, 2
    kv = 8 * 128
    expected_sharded = beta * s * b * (2 * h + 2 * kv + 3 * 11008)
    replicated = s * b * h * (4 * beta + 2)
    got = mem.transformer_layer_activation_bytes(gqa, b, 1, False, "selective", beta)
    assert got == replicated + expected_sharded
    assert got != mem.transformer_layer_activation_bytes(mha, b, 1, False, "selective", beta)


def test_recompute_transient() -> None:
    f = gpt(hidden=2048, heads=16)
    act = mem.transformer_layer_activation_bytes
    assert mem.recompute_transient_bytes(f, 2, 4, True, "none", 2) == 0
    assert mem.recompute_transient_bytes(f, 2, 4, True, "full", 2) == act(f, 2, 4, True, "none", 2)
    core = act(f, 2, 4, True, "none", 2) - act(f, 2, 4, True, "selective", 2)
    assert mem.recompute_transient_bytes(f, 2, 4, True, "selective", 2) == pytest.approx(core)


def test_embedding_and_output_layer() -> None:
    f = gpt(hidden=1024, heads=16, seq=2048, vocab=50000)
    assert mem.embedding_activation_bytes(f, 4, 8, False) == 2048 * 4 * 1024
    assert mem.embedding_activation_bytes(f, 4, 8, True) == 2048 * 4 * 1024 / 8
    out = mem.output_layer_activation_bytes(f, 4, 8, True, 2)
    assert out == 2 * 2 * 2048 * 4 * 1024 / 8 + 4 * 2048 * 4 * 50000 / 8
    # The logits dominate for a large vocabulary: s·b·V/t fp32 values.
    assert out > 4 * 2048 * 4 * 50000 / 8


# ------------------------------------------------------------------------ pipeline in-flight counts


def test_in_flight_closed_forms() -> None:
    assert [mem.in_flight_microbatches("1f1b", i, 4, 16) for i in range(4)] == [4, 3, 2, 1]
    assert [mem.in_flight_microbatches("1f1b", i, 4, 2) for i in range(4)] == [2, 2, 2, 1]
    assert mem.in_flight_microbatches("gpipe", 3, 4, 16) == 16
    assert mem.in_flight_microbatches("interleaved", 0, 4, 16, 2) == pytest.approx(4 * mem.interleaving_factor(4, 2))
    assert mem.interleaving_factor(4, 2) == 1 + 3 / 8
    with pytest.raises(ValueError, match="stage_index"):
        mem.in_flight_microbatches("1f1b", 4, 4, 16)
    with pytest.raises(ValueError, match="schedule"):
        mem.in_flight_microbatches("zb", 0, 4, 16)  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(p=st.integers(1, 8), k=st.integers(1, 6), v=st.integers(2, 4), name=st.sampled_from(["gpipe", "1f1b", "interleaved"]))
def test_in_flight_matches_the_generated_schedules(p: int, k: int, v: int, name: str) -> None:
    m = k * p
    if name != "interleaved":
        v = 1
    schedule = build(name, p, m, v)  # type: ignore[arg-type]
    for i in range(p):
        assert peak_in_flight(schedule[i]) == pytest.approx(mem.in_flight_microbatches(name, i, p, m, v) * v)  # type: ignore[arg-type]


def test_activation_and_memory_per_stage() -> None:
    acts = mem.activation_bytes_per_stage([10.0, 10.0, 10.0, 12.0], "1f1b", m=8)
    assert acts == [40.0, 30.0, 20.0, 12.0]
    stages = mem.memory_per_stage(
        [1e9, 1e9, 1e9, 1e9], acts, [5.0] * 4, 2.0**31, zero_stage=1, dp=4, precision="bf16", optimizer="adam"
    )
    assert [s.stage for s in stages] == [0, 1, 2, 3]
    first = stages[0]
    assert (first.params, first.grads, first.optimizer) == (2e9, 2e9, 3e9)
    assert first.total == 7e9 + 40.0 + 5.0 + 2.0**31
    assert stages[0].total > stages[3].total
    with pytest.raises(ValueError, match="one entry per stage"):
        mem.memory_per_stage([1.0], [1.0, 2.0], [0.0], 0, zero_stage=0, dp=1, precision="fp32", optimizer="sgd")


# ---------------------------------------------------------------- parameters: Megatron-LM Table 1


def test_parameter_counts_reproduce_megatron_table1() -> None:
    for row in read_csv("megatron_sc21_table1.csv"):
        f = gpt(layers=int(row["layers"]), hidden=int(row["hidden"]), heads=int(row["heads"]))
        total = f.layers * mem.transformer_layer_params(f) + mem.embedding_params(f)
        printed = row["params_billion"]
        assert quantize(total / 1e9, printed, ROUND_HALF_UP) == Decimal(printed), (row, total)


def test_layer_params_is_megatron_eq2_term() -> None:
    f = gpt(hidden=4096, heads=32)
    assert mem.transformer_layer_params(f) == 12 * 4096**2 + 13 * 4096
