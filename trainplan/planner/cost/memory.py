"""Memory per device: model states (ZeRO), activations per in-flight micro-batch, framework overhead.

Units: bytes (``float``, so 1T-parameter models do not need big integers), counts of parameters
and elements. Shapes use Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models") letters: ``s`` sequence, ``b`` micro-batch, ``h`` hidden, ``a`` heads,
``t`` tensor-parallel degree, ``p`` pipeline stages, ``m`` micro-batches, ``v`` model chunks per
pipeline rank (interleaving).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from trainplan.ir.facts import TransformerFacts

Precision = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["sgd", "adam", "adamw"]
Recompute = Literal["none", "selective", "full"]
Schedule = Literal["gpipe", "1f1b", "interleaved"]

MASK_BYTES = 1  # dropout masks are stored as one byte per element (Korthikanti et al. 2022, Sec. 4.1)
FP32_BYTES = 4


@dataclass(frozen=True, slots=True)
class MemoryParts:
    """Model-state bytes on one device."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


@dataclass(frozen=True, slots=True)
class StageMemory:
    """Peak bytes on one device of pipeline stage ``stage``, by kind."""

    stage: int
    params: float
    grads: float
    optimizer: float
    activations: float  # stored for the backward pass, summed over in-flight micro-batches
    transient: float  # live only while one layer is recomputed (Korthikanti et al. 2022, Sec. 5)
    reserved: float  # framework overhead: CUDA context, communication buffers, fragmentation

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.transient + self.reserved


# ------------------------------------------------------------------------------------ model states


def state_bytes_per_param(precision: Precision, optimizer: Optimizer) -> tuple[int, int, int]:
    """Bytes per parameter of (parameters, gradients, optimizer state) — the ``2 + 2 + K`` of ZeRO.

    Rajbhandari et al. 2020, Sec. 3.1:

    * mixed precision (bf16/fp16) with Adam/AdamW: 2 (16-bit weights) + 2 (16-bit gradients) +
      K = 12 (fp32 master weights, momentum and variance, 4 bytes each);
    * mixed precision with SGD (no momentum): 2 + 2 + K = 4 (the fp32 master weights only);
    * fp32 with Adam/AdamW: 4 + 4 + K = 8 (momentum and variance; the weights are the master copy);
    * fp32 with SGD (no momentum): 4 + 4 + 0.
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; expected 'fp32', 'bf16' or 'fp16'")
    if optimizer not in ("sgd", "adam", "adamw"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd', 'adam' or 'adamw'")
    adam = optimizer in ("adam", "adamw")
    if precision == "fp32":
        return FP32_BYTES, FP32_BYTES, 2 * FP32_BYTES if adam else 0
    master = FP32_BYTES
    return 2, 2, master + (2 * FP32_BYTES if adam else 0)


def model_state_bytes(params: float, zero_stage: int, dp: int, precision: Precision, optimizer: Optimizer) -> MemoryParts:
    """Bytes of parameters, gradients and optimizer state per device for ``params`` parameters.

    ZeRO-DP partitions the states over the ``N_d = dp`` data-parallel ranks (Rajbhandari et al.
    2020, Sec. 5, Fig. 1, Table 1), with ``Ψ`` parameters and ``2 + 2 + K`` bytes each:

    * stage 0 (baseline DP): ``(2 + 2 + K)·Ψ``;
    * stage 1, P_os: ``4Ψ + K·Ψ/N_d``;
    * stage 2, P_os+g: ``2Ψ + (2 + K)·Ψ/N_d``;
    * stage 3, P_os+g+p: ``(2 + 2 + K)·Ψ/N_d``.

    In fp32, stage 2 also holds a separate fp32 master copy of its partition, ``4Ψ/N_d`` (counted
    with the optimizer state): the full parameters the forward and backward compute with are
    gathered once and kept, and the optimizer updates this rank's shard of them — FSDP2's
    ``reshard_after_forward=False``, which the runtime executes for ZeRO-2 (DeepSpeed's ZeRO-1/2
    also keep an fp32 partition). In mixed precision K already counts the master weights.

    ``params`` is what one model replica holds on the device (after tensor and pipeline splits).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if dp <= 0:
        raise ValueError(f"data-parallel degree must be positive, got {dp}")
    if params < 0:
        raise ValueError(f"parameter count must be non-negative, got {params}")
    per_param, per_grad, k = state_bytes_per_param(precision, optimizer)
    if precision == "fp32" and zero_stage == 2 and dp > 1:
        k += FP32_BYTES  # the sharded master copy (see above; nothing is sharded at dp = 1)
    return MemoryParts(
        params=params * per_param / (dp if zero_stage >= 3 else 1),
        grads=params * per_grad / (dp if zero_stage >= 2 else 1),
        optimizer=params * k / (dp if zero_stage >= 1 else 1),
    )


def transformer_layer_params(facts: TransformerFacts) -> float:
    """Parameters of one transformer layer, weights and biases.

    Megatron-LM's count (Narayanan et al. 2021, Eq. 2, per layer ``12h² + 13h`` for ``f = 4h``):
    Q, K, V and output projections, two MLP projections, each with a bias, and two LayerNorms
    (weight and bias). Grouped-query attention narrows K and V to ``kv_heads·h/a``; a gated MLP has
    a third ``h×f`` projection.
    """
    h, f = facts.hidden, facts.ffn_hidden
    kv = facts.kv_heads * (h // facts.heads)
    attention = (h * h + h) * 2 + (h * kv + kv) * 2
    mlp_in = (2 if facts.gated_mlp else 1) * (h * f + f)
    mlp = mlp_in + f * h + h
    return float(attention + mlp + 4 * h)


def embedding_params(facts: TransformerFacts) -> float:
    """Word (``V·h``) and learned position (``s·h``) embeddings, plus an untied output projection.

    Narayanan et al. 2021, Eq. 2 counts ``(V + s)·h`` with a tied output layer.
    """
    h = facts.hidden
    words = facts.vocab * h
    positions = facts.seq_len * h if facts.learned_positions else 0
    head = 0 if facts.tied_embeddings else facts.vocab * h
    return float(words + positions + head)


# ------------------------------------------------------------------------------------ activations


def _layer_activation_terms(facts: TransformerFacts, micro_batch: int, dtype_bytes: int) -> tuple[float, float, float]:
    """Bytes per layer and micro-batch, unsharded: (replicated in TP, TP-sharded, attention core).

    Korthikanti et al. 2022, Sec. 4.1, with ``β = dtype_bytes`` and one-byte dropout masks:

    * replicated under TP (10·sbh at β = 2): LayerNorm inputs (2·β·sbh), the QKV and first MLP
      projection inputs (2·β·sbh), the two dropout masks after attention and MLP (2·sbh);
    * sharded by TP (24·sbh at β = 2): Q and K (2·β·sbh), V (β·sbh), the output projection input
      (β·sbh), the MLP's activation input and second projection input (2·β·sbf = 8·β·sbh);
    * attention core (5·as²b at β = 2): softmax output and its dropout output (2·β·as²b) and the
      dropout mask (as²b).

    Generalisations (equal to the paper for MHA with ``f = 4h``): K and V are ``kv_heads·h/a`` wide
    (grouped-query attention); a gated MLP stores three ``s·b·f`` tensors (gate and up outputs and
    their product, as Megatron-LM's fused SwiGLU saves its two inputs).
    """
    s, b, h, a, f = facts.seq_len, micro_batch, facts.hidden, facts.heads, facts.ffn_hidden
    sbh = float(s) * b * h
    kv = float(s) * b * facts.kv_heads * (h // a)
    mlp_tensors = 3 if facts.gated_mlp else 2
    replicated = sbh * (4 * dtype_bytes + 2 * MASK_BYTES)
    sharded = dtype_bytes * (sbh + kv + kv + sbh + mlp_tensors * float(s) * b * f)
    core = float(a) * s * s * b * (2 * dtype_bytes + MASK_BYTES)
    return replicated, sharded, core


def transformer_layer_activation_bytes(
    facts: TransformerFacts,
    micro_batch: int,
    tp: int,
    sequence_parallel: bool,
    recompute: Recompute,
    dtype_bytes: int,
) -> float:
    """Bytes one transformer layer keeps for its backward pass, per micro-batch, on one TP rank.

    Korthikanti et al. 2022, Table 2 (per layer, β = 2):

    * no parallelism: ``sbh·(34 + 5as/h)``;
    * tensor parallel: ``sbh·(10 + 24/t + 5as/(ht))``;
    * tensor + sequence parallel: ``sbh/t·(34 + 5as/h)``;
    * selective recomputation drops the ``5as/h`` attention-core term;
    * full recomputation keeps only the layer input, ``2·sbh`` (``2·sbh/t`` when the input is
      sequence-parallel); the layer's activations come back during its backward, see
      :func:`recompute_transient_bytes`.
    """
    if tp <= 0:
        raise ValueError(f"tensor-parallel degree must be positive, got {tp}")
    sp_div = tp if sequence_parallel else 1
    if recompute == "full":
        return dtype_bytes * float(facts.seq_len) * micro_batch * facts.hidden / sp_div
    replicated, sharded, core = _layer_activation_terms(facts, micro_batch, dtype_bytes)
    if recompute == "selective":
        core = 0.0
    elif recompute != "none":
        raise ValueError(f"unknown recompute policy {recompute!r}; expected 'none', 'selective' or 'full'")
    return replicated / sp_div + (sharded + core) / tp


def recompute_transient_bytes(
    facts: TransformerFacts,
    micro_batch: int,
    tp: int,
    sequence_parallel: bool,
    recompute: Recompute,
    dtype_bytes: int,
) -> float:
    """Bytes live while one layer is recomputed in the backward pass (once per stage, not per micro-batch).

    Full recomputation rebuilds one layer's activations at a time, so one layer's un-recomputed
    activations are live on top of the stored inputs; selective recomputation rebuilds one
    layer's attention core (Korthikanti et al. 2022, Sec. 5).
    """
    if recompute == "none":
        return 0.0
    if recompute == "full":
        return transformer_layer_activation_bytes(facts, micro_batch, tp, sequence_parallel, "none", dtype_bytes)
    if recompute == "selective":
        return _layer_activation_terms(facts, micro_batch, dtype_bytes)[2] / tp
    raise ValueError(f"unknown recompute policy {recompute!r}; expected 'none', 'selective' or 'full'")


def traced_activation_bytes(
    none: float,
    none_sharded: float,
    selective: float,
    selective_sharded: float,
    full: float,
    micro_batch: int,
    tp: int,
    sequence_parallel: bool,
    recompute: Recompute,
) -> tuple[float, float]:
    """(stored, transient) bytes of one traced unit per micro-batch on one TP rank.

    The inputs are what the traced model's own ops save for backward per sample, in bytes at the
    compute dtype (``model_costs.traced_activations``): ``none``, ``selective`` (the runtime's
    policy: inputs plus the outputs of matrix products, norm kernels and activation functions) and
    ``full`` (the unit's inputs); ``*_sharded`` is the part inside the column- to row-parallel
    region, divided by ``t``; the rest is divided by ``t`` only with sequence parallelism
    (Korthikanti et al. 2022, Sec. 4.2's split, applied to the saved tensors themselves rather than
    to the closed form, which counts attention scores that fused attention kernels never store).
    Scaled linearly by the micro-batch (the trace is at batch 1). ``transient``: what one unit
    rebuilds in its backward when recomputed (full: its ``none`` bytes; selective: the difference),
    live once per stage, as in :func:`recompute_transient_bytes`.
    """
    if tp <= 0:
        raise ValueError(f"tensor-parallel degree must be positive, got {tp}")
    sp_div = tp if sequence_parallel else 1

    def local(total: float, sharded: float) -> float:
        return micro_batch * ((total - sharded) / sp_div + sharded / tp)

    stored_none = local(none, none_sharded)
    if recompute == "none":
        return stored_none, 0.0
    if recompute == "selective":
        stored = local(selective, selective_sharded)
    elif recompute == "full":
        stored = micro_batch * full / sp_div
    else:
        raise ValueError(f"unknown recompute policy {recompute!r}; expected 'none', 'selective' or 'full'")
    return stored, max(0.0, stored_none - stored) if recompute == "selective" else stored_none


def embedding_activation_bytes(facts: TransformerFacts, micro_batch: int, tp: int, sequence_parallel: bool) -> float:
    """Bytes the input embedding keeps per micro-batch: its dropout mask, ``s·b·h`` one-byte elements.

    Korthikanti et al. 2022, Sec. 4.3 (``sbh/t`` per micro-batch with sequence parallelism; the
    embedding lookup itself stores only the token ids).
    """
    sp_div = tp if sequence_parallel else 1
    return MASK_BYTES * float(facts.seq_len) * micro_batch * facts.hidden / sp_div


def output_layer_activation_bytes(
    facts: TransformerFacts,
    micro_batch: int,
    tp: int,
    sequence_parallel: bool,
    dtype_bytes: int,
    logits_bytes: int = FP32_BYTES,
) -> float:
    """Bytes the final LayerNorm, the output projection and the loss keep per micro-batch.

    Korthikanti et al. 2022, Sec. 4.3: the LayerNorm and projection inputs (``2·β·sbh``, divided
    by ``t`` with sequence parallelism) and the logits of the vocabulary-parallel cross-entropy,
    ``s·b·V/t`` values of ``logits_bytes`` each (Megatron-LM computes the loss in fp32).
    """
    s, b, h = float(facts.seq_len), micro_batch, facts.hidden
    sp_div = tp if sequence_parallel else 1
    return 2 * dtype_bytes * s * b * h / sp_div + logits_bytes * s * b * facts.vocab / tp


# ------------------------------------------------------------------------- pipeline in-flight count


def in_flight_microbatches(schedule: Schedule, stage_index: int, p: int, m: int, v: int = 1) -> float:
    """Micro-batches whose activations pipeline stage ``stage_index`` holds at its peak.

    In units of "all of this stage's layers for one micro-batch":

    * GPipe: all ``m`` (every forward runs before any backward; Huang et al. 2019);
    * 1F1B: ``min(p − i, m)`` on stage ``i`` (its warm-up forwards plus one; Narayanan et al. 2021,
      Sec. 2.2.1);
    * interleaved 1F1B: rank ``i`` runs ``(v − 1)·p + 2·(p − 1 − i)`` warm-up forwards of one model
      chunk (``1/v`` of its layers) before its first backward (Megatron-LM's schedule), so it holds
      ``((v − 1)·p + 2·(p − 1 − i) + 1) / v`` micro-batches; for the first stage that is
      ``p · (1 + (p − 1)/(p·v))``, Korthikanti et al. 2022 Sec. 4.2.3's factor
      (:func:`interleaving_factor`).
    """
    _check_pipeline(stage_index, p, m, v)
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(p - stage_index, m))
    if schedule == "interleaved":
        warmup = (v - 1) * p + 2 * (p - 1 - stage_index)
        return min(warmup + 1, m * v) / v
    raise ValueError(f"unknown schedule {schedule!r}; expected 'gpipe', '1f1b' or 'interleaved'")


def interleaving_factor(p: int, v: int) -> float:
    """First-stage activation memory of interleaved 1F1B relative to 1F1B: ``1 + (p − 1)/(p·v)``.

    Korthikanti et al. 2022, Sec. 4.2.3 (their ``m`` is the number of interleaved model chunks per
    rank, our ``v``).
    """
    if p <= 0 or v <= 0:
        raise ValueError(f"p and v must be positive, got p={p}, v={v}")
    return 1.0 + (p - 1) / (p * v)


def activation_bytes_per_stage(per_microbatch: Sequence[float], schedule: Schedule, m: int, v: int = 1) -> list[float]:
    """Peak stored activation bytes on each stage: per-micro-batch bytes × in-flight micro-batches.

    ``per_microbatch[k]`` is what stage ``k`` stores for one micro-batch (all its chunks: the
    Korthikanti formulas for its transformer layers, measured bytes for anything else, the
    embedding on the first stage and the output layer on the last). The recomputation working
    set is separate (:func:`recompute_transient_bytes`): it is live once, not per micro-batch.
    """
    p = len(per_microbatch)
    return [per_microbatch[k] * in_flight_microbatches(schedule, k, p, m, v) for k in range(p)]


def memory_per_stage(
    stage_params: Sequence[float],
    activations: Sequence[float],
    transient: Sequence[float],
    reserved: float,
    *,
    zero_stage: int,
    dp: int,
    precision: Precision,
    optimizer: Optimizer,
) -> list[StageMemory]:
    """The memory breakdown of one device of each stage.

    ``stage_params[k]``: parameters a device of stage ``k`` holds (already divided by TP);
    ``activations[k]``: peak stored activation bytes (:func:`activation_bytes_per_stage`);
    ``transient[k]``: recomputation working set (:func:`recompute_transient_bytes`);
    ``reserved``: framework overhead in bytes (``Device.memory_reserved``).
    """
    if not len(stage_params) == len(activations) == len(transient):
        raise ValueError(
            f"stage_params, activations and transient must have one entry per stage, got "
            f"{len(stage_params)}, {len(activations)} and {len(transient)}"
        )
    out = []
    for k, (params, acts, extra) in enumerate(zip(stage_params, activations, transient)):
        state = model_state_bytes(params, zero_stage, dp, precision, optimizer)
        out.append(StageMemory(k, state.params, state.grads, state.optimizer, acts, extra, float(reserved)))
    return out


def _check_pipeline(stage_index: int, p: int, m: int, v: int) -> None:
    if p <= 0 or m <= 0 or v <= 0:
        raise ValueError(f"p, m and v must be positive, got p={p}, m={m}, v={v}")
    if not 0 <= stage_index < p:
        raise ValueError(f"stage_index must be in [0, {p}), got {stage_index}")
