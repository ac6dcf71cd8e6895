"""Compute model: layer FLOPs (Megatron-LM Eq. 3), recomputation, roofline GEMM efficiency, time."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainplan.ir.cluster import load_preset
from trainplan.ir.facts import TransformerFacts
from trainplan.planner.cost import compute as cc

DATA = Path(__file__).resolve().parents[2] / "bench" / "data"
A100 = load_preset("a100-80g").device
# A100-SXM4-80GB HBM2e bandwidth from the NVIDIA A100 datasheet (2,039 GB/s); test input only —
# the cluster does not describe memory bandwidth yet.
A100_HBM = 2.039e12


def gpt(layers: int = 24, hidden: int = 1024, heads: int = 16, seq: int = 2048, vocab: int = 51200) -> TransformerFacts:
    return TransformerFacts(
        kind="decoder", layers=layers, hidden=hidden, heads=heads, kv_heads=heads, ffn_hidden=4 * hidden,
        vocab=vocab, seq_len=seq, tied_embeddings=True,
    )


@settings(max_examples=40, deadline=None)
@given(heads=st.sampled_from([8, 16, 32]), head_dim=st.sampled_from([64, 128]), seq=st.sampled_from([128, 2048]),
       b=st.integers(1, 8), t=st.sampled_from([1, 2, 4, 8]))
def test_layer_flops_is_megatron_layer_term(heads: int, head_dim: int, seq: int, b: int, t: int) -> None:
    f = gpt(hidden=heads * head_dim, heads=heads, seq=seq)
    h, s = f.hidden, f.seq_len
    assert cc.transformer_layer_flops(f, b, t) == (24 * b * s * h * h + 4 * b * s * s * h) / t


def test_iteration_flops_equal_megatron_eq3_for_table1() -> None:
    with open(DATA / "megatron_sc21_table1.csv") as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    assert len(rows) == 10
    for row in rows:
        l, h, batch = int(row["layers"]), int(row["hidden"]), int(row["global_batch"])
        f = gpt(layers=l, hidden=h, heads=int(row["heads"]))
        s, vocab = 2048, 51200
        eq3 = 96 * batch * s * l * h**2 * (1 + s / (6 * h) + vocab / (16 * l * h))
        assert cc.megatron_iteration_flops(f, batch, "full") == pytest.approx(eq3, rel=1e-12)


def test_iteration_flops_without_recompute_is_three_quarters_of_the_layer_work() -> None:
    f = gpt(hidden=2048, heads=16)
    layer = cc.transformer_layer_flops(f, 8)
    head = cc.lm_head_flops(f, 8)
    assert cc.megatron_iteration_flops(f, 8, "none") == pytest.approx(f.layers * 3 * layer + 3 * head)
    assert cc.megatron_iteration_flops(f, 8, "full") == pytest.approx(f.layers * 4 * layer + 3 * head)


def test_recompute_flops() -> None:
    f = gpt(hidden=4096, heads=32)
    b, t = 2, 4
    assert cc.recompute_flops(f, b, t, "none") == 0
    assert cc.recompute_flops(f, b, t, "selective") == 4 * b * 2048**2 * 4096 / t
    assert cc.recompute_flops(f, b, t, "full") == cc.transformer_layer_flops(f, b, t)
    assert cc.recompute_flops(f, b, t, "selective") < cc.recompute_flops(f, b, t, "full")
    with pytest.raises(ValueError, match="recompute"):
        cc.recompute_flops(f, b, t, "some")  # type: ignore[arg-type]


def test_gqa_and_gated_mlp_flops() -> None:
    llama7b = TransformerFacts("decoder", 32, 4096, 32, 32, 11008, 32000, 2048, False, gated_mlp=True)
    b, s, h, f = 1, 2048, 4096, 11008
    expected = 2 * b * s * h * 3 * h + 4 * b * s * s * h + 2 * b * s * h * h + 3 * 2 * b * s * h * f
    assert cc.transformer_layer_flops(llama7b, b) == expected
    gqa = TransformerFacts("decoder", 32, 4096, 32, 8, 11008, 32000, 2048, False, gated_mlp=True)
    assert cc.transformer_layer_flops(gqa, b) == expected - 2 * b * s * h * (2 * h - 2 * 1024)


def test_tp_must_divide_heads() -> None:
    with pytest.raises(ValueError, match="tp=3 must divide heads=16"):
        cc.transformer_layer_flops(gpt(), 1, 3)


def test_arithmetic_intensity_of_a_square_gemm() -> None:
    assert cc.gemm_arithmetic_intensity(4096, 4096, 4096, 2) == pytest.approx(2 * 4096 / 6)
    with pytest.raises(ValueError, match="positive"):
        cc.gemm_arithmetic_intensity(0, 1, 1, 2)


def test_gemm_efficiency_follows_the_roofline() -> None:
    # Large: compute-bound at the declared efficiency.
    assert cc.gemm_efficiency(A100, "bf16", 8192, 8192, 8192, A100_HBM) == A100.efficiency
    # Matrix-vector product: intensity ~1 FLOP/byte, bandwidth-bound.
    gemv = cc.gemm_efficiency(A100, "bf16", 8192, 1, 8192, A100_HBM)
    intensity = cc.gemm_arithmetic_intensity(8192, 1, 8192, 2)
    assert gemv == pytest.approx(intensity * A100_HBM / 312e12)
    assert gemv < 0.01
    # Unknown memory bandwidth: every GEMM at the compute roof.
    assert cc.gemm_efficiency(A100, "bf16", 8192, 1, 8192, None) == A100.efficiency


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 1 << 14), n=st.integers(1, 1 << 14), k=st.integers(1, 1 << 14), dtype=st.sampled_from(["fp16", "fp32"]))
def test_gemm_efficiency_monotone_and_bounded(m: int, n: int, k: int, dtype: str) -> None:
    e = cc.gemm_efficiency(A100, dtype, m, n, k, A100_HBM)
    assert 0 < e <= A100.efficiency
    assert cc.gemm_efficiency(A100, dtype, 2 * m, n, k, A100_HBM) >= e
    assert cc.gemm_efficiency(A100, dtype, m, 2 * n, k, A100_HBM) >= e
    assert cc.gemm_efficiency(A100, dtype, m, n, 2 * k, A100_HBM) >= e


@settings(max_examples=30, deadline=None)
@given(hidden=st.sampled_from([512, 1024, 4096, 12288]), b=st.integers(1, 4), seq=st.sampled_from([128, 512, 2048]))
def test_smaller_tensor_parallel_shards_are_no_more_efficient(hidden: int, b: int, seq: int) -> None:
    f = gpt(hidden=hidden, heads=hidden // 128 if hidden >= 1024 else 8, seq=seq)
    effs = [cc.transformer_layer_efficiency(f, b, t, A100, "bf16", A100_HBM) for t in (1, 2, 4, 8)]
    assert all(a >= b_ for a, b_ in zip(effs, effs[1:]))
    assert all(0 < e <= A100.efficiency for e in effs)


def test_small_model_on_many_tp_ranks_loses_efficiency() -> None:
    small = gpt(hidden=512, heads=8, seq=128)
    big = cc.transformer_layer_efficiency(small, 1, 1, A100, "bf16", A100_HBM)
    sharded = cc.transformer_layer_efficiency(small, 1, 8, A100, "bf16", A100_HBM)
    assert sharded < big < A100.efficiency


def test_compute_time() -> None:
    assert cc.compute_time_s(312e12, A100, "bf16", 0.5) == 2.0
    # fp32 math on A100 uses its declared fp32 peak, not TF32.
    assert cc.compute_time_s(19.5e12, A100, "fp32", 1.0) == 1.0
    v100 = load_preset("v100-32g").device
    with pytest.raises(ValueError, match="no peak for 'bf16'"):
        cc.compute_time_s(1.0, v100, "bf16", 0.5)
    with pytest.raises(ValueError, match="efficiency"):
        cc.compute_time_s(1.0, A100, "bf16", 0.0)


@settings(max_examples=50, deadline=None)
@given(flops=st.floats(0, 1e18), e1=st.floats(0.01, 1.0), e2=st.floats(0.01, 1.0))
def test_compute_time_monotone(flops: float, e1: float, e2: float) -> None:
    lo, hi = sorted((e1, e2))
    assert cc.compute_time_s(flops, A100, "bf16", hi) <= cc.compute_time_s(flops, A100, "bf16", lo)
    assert cc.compute_time_s(flops * 2, A100, "bf16", lo) >= cc.compute_time_s(flops, A100, "bf16", lo)


def test_backward_is_twice_forward_and_dtype_bytes() -> None:
    assert cc.backward_flops(3.0) == 6.0
    assert [cc.dtype_bytes(d) for d in ("fp32", "tf32", "bf16", "fp16")] == [4, 4, 2, 2]
    with pytest.raises(ValueError, match="unknown dtype"):
        cc.dtype_bytes("fp8")
