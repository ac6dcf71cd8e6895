"""Compute time: FLOPs of a transformer layer over the speed a device reaches on its GEMMs.

Units: FLOPs (floating-point operations, a multiply-add is 2), FLOP/s, bytes, seconds.
Shapes use Megatron-LM's letters (Narayanan et al. 2021, Sec. 5.1 / Appendix): ``b`` micro-batch
size, ``s`` sequence length, ``h`` hidden size, ``a`` attention heads, ``f`` MLP hidden size,
``V`` vocabulary, ``t`` tensor-parallel degree.

Every function is plain arithmetic on numbers and IR objects: the search calls them as cost tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainplan.ir.cluster import Device
from trainplan.ir.facts import TransformerFacts

Recompute = Literal["none", "selective", "full"]

# Bytes per element of each dtype the cluster describes (IEEE 754 binary32 / binary16, bfloat16).
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}

# Backward FLOPs per forward FLOP: each GEMM's backward computes the input gradient and the weight
# gradient, one GEMM of the forward's size each (Narayanan et al. 2021, Sec. 5.1: "the backward
# pass requires double the number of FLOPs since we need to calculate the gradients with respect
# to both input and weight tensors").
BACKWARD_PER_FORWARD = 2.0


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of ``dtype`` (fp32/tf32: 4, bf16/fp16: 2)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        known = ", ".join(sorted(DTYPE_BYTES))
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {known}") from None


# ------------------------------------------------------------------------------------------ GEMMs


@dataclass(frozen=True, slots=True)
class Gemm:
    """``count`` independent products ``(m, k) @ (k, n)``; FLOPs ``2·m·n·k`` each."""

    m: int
    n: int
    k: int
    count: int = 1

    @property
    def flops(self) -> float:
        """2·m·n·k·count FLOPs: m·n dot products of length k, a multiply and an add per term."""
        return 2.0 * self.m * self.n * self.k * self.count


def gemm_arithmetic_intensity(m: int, n: int, k: int, element_bytes: int) -> float:
    """FLOPs per byte of DRAM traffic of ``(m, k) @ (k, n)``, in FLOP/byte.

    ``2mnk / (β·(mk + kn + mn))``: each operand read once and the result written once, the traffic
    of an ideally tiled GEMM (the operational intensity of Williams, Waterman & Patterson,
    "Roofline", CACM 2009, Sec. 2). Small shards (a tensor-parallel slice with ``n = h/t``) have a
    lower intensity than the full product.
    """
    if min(m, n, k) <= 0:
        raise ValueError(f"GEMM dimensions must be positive, got m={m}, n={n}, k={k}")
    return 2.0 * m * n * k / (element_bytes * (m * k + k * n + m * n))


def roofline_efficiency(
    intensity: float, device: Device, dtype: str, memory_bandwidth: float | None
) -> float:
    """Fraction of ``device.peak(dtype)`` a kernel of ``intensity`` FLOP/byte achieves.

    Roofline (Williams et al. 2009, Eq. 1): attainable FLOP/s = min(peak, intensity × memory
    bandwidth). The compute roof is the large-GEMM efficiency the cluster declares
    (``device.efficiency``, a fraction), so the curve rises linearly with intensity below the ridge
    point ``efficiency·peak / bandwidth`` and saturates at ``device.efficiency`` above it.

    ``memory_bandwidth`` (bytes/s of device memory) is not yet a field of
    :class:`~trainplan.ir.cluster.Device`; with ``None`` the memory roof is unknown and every GEMM
    is taken to be compute-bound (``device.efficiency``).
    """
    roof = device.efficiency
    if memory_bandwidth is None:
        return roof
    if memory_bandwidth <= 0:
        raise ValueError(f"memory_bandwidth must be positive bytes/s, got {memory_bandwidth}")
    return min(roof, intensity * memory_bandwidth / _peak(device, dtype))


def gemm_efficiency(
    device: Device, dtype: str, m: int, n: int, k: int, memory_bandwidth: float | None
) -> float:
    """Fraction of peak one ``(m, k) @ (k, n)`` product reaches: the roofline at its intensity."""
    intensity = gemm_arithmetic_intensity(m, n, k, dtype_bytes(dtype))
    return roofline_efficiency(intensity, device, dtype, memory_bandwidth)


def combined_efficiency(gemms: list[Gemm], device: Device, dtype: str, memory_bandwidth: float | None) -> float:
    """Efficiency of running ``gemms`` back to back: total FLOPs over total time, as a fraction of peak.

    The time of each product is ``flops / (peak · efficiency)``, so the combined efficiency is
    the FLOP-weighted harmonic mean ``Σ flops / Σ (flops / efficiency)``.
    """
    total = 0.0
    weighted = 0.0
    for g in gemms:
        eff = gemm_efficiency(device, dtype, g.m, g.n, g.k, memory_bandwidth)
        total += g.flops
        weighted += g.flops / eff
    if total == 0.0:
        raise ValueError("no GEMMs to combine")
    return total / weighted


# ---------------------------------------------------------------------------- transformer layers


def _kv_hidden(facts: TransformerFacts) -> int:
    """Width of the key (= value) projection: ``kv_heads · h/a`` (grouped-query attention)."""
    return facts.kv_heads * (facts.hidden // facts.heads)


def _mlp_matrices(facts: TransformerFacts) -> int:
    """Weight matrices of size h×f in the MLP: 2 (up, down), 3 with a gated unit (gate, up, down)."""
    return 3 if facts.gated_mlp else 2


def transformer_layer_gemms(facts: TransformerFacts, micro_batch: int, tp: int) -> list[Gemm]:
    """The forward GEMMs of one transformer layer on one of ``tp`` tensor-parallel ranks.

    Megatron-LM sharding (Shoeybi et al. 2019, Sec. 3): QKV and the MLP's first projection are
    column-parallel (output width / t), the attention output and the MLP's second projection are
    row-parallel (input width / t), attention heads are split across ranks. The attention core is
    ``b·a/t`` batched products ``(s, d)@(d, s)`` and ``(s, s)@(s, d)`` with ``d = h/a``.
    """
    _check_tp(facts, tp)
    b, s, h, f = micro_batch, facts.seq_len, facts.hidden, facts.ffn_hidden
    tokens, head_dim, local_heads = b * s, h // facts.heads, facts.heads // tp
    up = (_mlp_matrices(facts) - 1) * f // tp
    return [
        Gemm(tokens, (h + 2 * _kv_hidden(facts)) // tp, h),  # fused QKV projection
        Gemm(s, s, head_dim, b * local_heads),  # scores Q·K^T
        Gemm(s, head_dim, s, b * local_heads),  # softmax(scores)·V
        Gemm(tokens, h, h // tp),  # attention output projection
        Gemm(tokens, up, h),  # MLP up (and gate) projection
        Gemm(tokens, h, f // tp),  # MLP down projection
    ]


def transformer_layer_flops(facts: TransformerFacts, micro_batch: int, tp: int = 1) -> float:
    """Forward FLOPs of one transformer layer per micro-batch on one tensor-parallel rank.

    For multi-head attention with ``f = 4h`` this is Narayanan et al. 2021 (Sec. 5.1, the layer
    term of Eq. 3): ``24·b·s·h² + 4·b·s²·h`` FLOPs, divided by ``t``. Grouped-query attention and
    gated MLPs change only the projection widths (:func:`transformer_layer_gemms`).
    """
    return sum(g.flops for g in transformer_layer_gemms(facts, micro_batch, tp))


def attention_core_flops(facts: TransformerFacts, micro_batch: int, tp: int = 1) -> float:
    """Forward FLOPs of Q·K^T and softmax·V: ``4·b·s²·h / t`` (Korthikanti et al. 2022, Sec. 5)."""
    return 4.0 * micro_batch * facts.seq_len**2 * facts.hidden / tp


def lm_head_flops(facts: TransformerFacts, micro_batch: int, tp: int = 1) -> float:
    """Forward FLOPs of the output projection to the vocabulary: ``2·b·s·h·V / t``.

    Narayanan et al. 2021, Sec. 5.1 (the logit term of Eq. 3); the vocabulary is split over the
    tensor-parallel ranks (vocab-parallel output layer, Shoeybi et al. 2019, Sec. 3).
    """
    return 2.0 * micro_batch * facts.seq_len * facts.hidden * facts.vocab / tp


def backward_flops(forward_flops: float) -> float:
    """Backward FLOPs for ``forward_flops`` of GEMMs: twice the forward (Narayanan et al. 2021, Sec. 5.1)."""
    return BACKWARD_PER_FORWARD * forward_flops


def recompute_flops(facts: TransformerFacts, micro_batch: int, tp: int, recompute: Recompute) -> float:
    """Extra forward FLOPs per layer and micro-batch that activation recomputation adds to the backward.

    * ``none``: 0.
    * ``selective``: the attention core (Q·K^T and softmax·V) only — Korthikanti et al. 2022,
      Sec. 5 ("selective activation recomputation"), ``4·b·s²·h / t`` FLOPs.
    * ``full``: the layer's whole forward again (Chen et al. 2016; Narayanan et al. 2021, Sec. 5.1,
      which is why Eq. 3 counts four forward passes per layer instead of three).
    """
    if recompute == "none":
        return 0.0
    if recompute == "selective":
        return attention_core_flops(facts, micro_batch, tp)
    if recompute == "full":
        return transformer_layer_flops(facts, micro_batch, tp)
    raise ValueError(f"unknown recompute policy {recompute!r}; expected 'none', 'selective' or 'full'")


def megatron_iteration_flops(facts: TransformerFacts, global_batch: int, recompute: Recompute) -> float:
    """Model FLOPs of one training iteration over all devices (forward, backward and recompute).

    With full recomputation and a standard GPT layer this equals Narayanan et al. 2021 Eq. 3,
    ``96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))``: four layer-forwards (forward, recompute, and a
    backward of twice the forward) and three output-layer forwards (it is not recomputed).
    """
    layer = transformer_layer_flops(facts, global_batch)
    layers = facts.layers * (layer * (1.0 + BACKWARD_PER_FORWARD) + recompute_flops(facts, global_batch, 1, recompute))
    return layers + lm_head_flops(facts, global_batch) * (1.0 + BACKWARD_PER_FORWARD)


def transformer_layer_efficiency(
    facts: TransformerFacts, micro_batch: int, tp: int, device: Device, dtype: str, memory_bandwidth: float | None
) -> float:
    """Fraction of peak one layer's GEMMs reach on a tensor-parallel rank (:func:`combined_efficiency`).

    Shards shrink as ``t`` grows, their arithmetic intensity falls and so does this efficiency —
    the effect Narayanan et al. 2021 (Sec. 3.3, Fig. 13-14) measure for small per-GPU GEMMs.
    """
    return combined_efficiency(transformer_layer_gemms(facts, micro_batch, tp), device, dtype, memory_bandwidth)


def compute_time_s(flops: float, device: Device, dtype: str, efficiency: float) -> float:
    """Seconds to execute ``flops`` at ``efficiency`` (a fraction) of the device's dense peak for ``dtype``.

    ``t = F / (peak · efficiency)`` (the compute term of the roofline; Williams et al. 2009).
    """
    if not 0.0 < efficiency <= 1.0:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
    if flops < 0:
        raise ValueError(f"flops must be non-negative, got {flops}")
    return flops / (_peak(device, dtype) * efficiency)


def memory_bound_time_s(nbytes: float, device: Device) -> float:
    """Seconds to stream ``nbytes`` through device memory: the bandwidth term of the roofline.

    Williams et al. 2009: an operator of arithmetic intensity far below the ridge point (layer
    norms, GeLU, softmax, dropout, residual adds) runs at memory bandwidth, ``t = bytes / B_mem``.
    0 when the device declares no ``memory_bandwidth`` (everything then counts as compute).
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be non-negative, got {nbytes}")
    bandwidth = device.memory_bandwidth
    return nbytes / bandwidth if bandwidth else 0.0


def optimizer_bytes_per_param(precision: str, optimizer: str) -> int:
    """Bytes of memory traffic per parameter of one optimizer update (an element-wise, memory-bound pass).

    Adam/AdamW read the gradient, read and write the two moments and the fp32 weights; with mixed
    precision they read a 16-bit gradient and also write the 16-bit compute copy of the weights
    (Rajbhandari et al. 2020, Sec. 3.1 lists the states): 2 + 8 + 8 + 8 + 2 = 28 bytes, or
    4 + 8 + 8 + 4 = 24 in fp32. Plain SGD reads the gradient and updates the weights: 2 + 8 + 2 = 12
    mixed, 4 + 8 = 12 in fp32.
    """
    adam = optimizer in ("adam", "adamw")
    if precision == "fp32":
        return 24 if adam else 12
    return 28 if adam else 12


def optimizer_step_time_s(params: float, precision: str, optimizer: str, device: Device) -> float:
    """Seconds of one optimizer update of ``params`` parameters on one device: traffic over memory bandwidth."""
    return memory_bound_time_s(params * optimizer_bytes_per_param(precision, optimizer), device)


# Kernels one transformer layer launches in its forward pass, counted from Megatron-LM's GPT layer
# with its fused kernels (Narayanan et al. 2021, Sec. 4.2): 2 LayerNorms, 4 GEMMs (QKV, output
# projection, MLP up and down), 2 batched GEMMs of the attention core, the fused scale-mask-softmax,
# attention dropout, 2 fused bias-dropout-adds, the fused bias-GeLU and ~5 layout copies
# (transposes / views made contiguous) = 19. The backward launches about twice as many.
LAYER_FORWARD_KERNELS = 19


def kernel_overhead_s(kernels: float, device: Device) -> float:
    """Seconds of fixed per-kernel cost: ``kernels · device.kernel_launch``.

    Launch latency and the tail of each kernel do not shrink with the work a kernel does, so they
    weigh on small micro-batches and thin tensor-parallel shards (Narayanan et al. 2021, Sec. 5.6:
    throughput grows with the micro-batch size until the GEMMs saturate the device).
    """
    if kernels < 0:
        raise ValueError(f"kernels must be non-negative, got {kernels}")
    return kernels * device.kernel_launch


def _peak(device: Device, dtype: str) -> float:
    try:
        return device.peak(dtype)
    except KeyError:
        known = ", ".join(sorted(device.peak_flops))
        raise ValueError(f"device {device.name!r} declares no peak for {dtype!r}; it has {known}") from None


def _check_tp(facts: TransformerFacts, tp: int) -> None:
    if tp <= 0:
        raise ValueError(f"tensor-parallel degree must be positive, got {tp}")
    for name, value in (("heads", facts.heads), ("kv_heads", facts.kv_heads), ("ffn_hidden", facts.ffn_hidden)):
        if value % tp:
            raise ValueError(f"tp={tp} must divide {name}={value} to shard the layer evenly (Megatron-LM)")
