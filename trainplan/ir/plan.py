"""The plan: the fully resolved, executable output of the planner. No ``auto`` is left.

A plan is an artifact — search → save ``plan.yaml`` → review the report → load → run. It carries
the spec it came from (with the cluster expanded) and that spec's hash, so the runtime needs
nothing else and ``trainplan plan plan.yaml`` re-reports without searching.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, model_validator

from trainplan.ir.base import Strict
from trainplan.ir.spec import AllReduce, CommSpec, Compression, Recompute, Schedule, Spec, SyncMode

PLAN_VERSION = 1
# "qkv": a fused [q | k | v] projection split column-wise so that each rank holds its own heads of
# each part (runtime.tensor_parallel); the others are Megatron-LM's (Shoeybi et al. 2019, Sec. 3).
TPStyle = Literal["colwise", "rowwise", "vocab", "replicate", "qkv"]


class Mesh(Strict):
    """Device mesh with dims ``(pp, dp, tp)``, TP innermost so a TP group stays inside a node."""

    pp: PositiveInt = Field(description="Pipeline stages.")
    dp: PositiveInt = Field(description="Data-parallel replicas.")
    tp: PositiveInt = Field(description="Tensor-parallel shards.")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def rank(self, pp: int, dp: int, tp: int) -> int:
        """Global rank of mesh coordinate ``(pp, dp, tp)`` (row-major, tp fastest)."""
        return (pp * self.dp + dp) * self.tp + tp


class StagePlan(Strict):
    index: NonNegativeInt = Field(description="Pipeline stage index (virtual stage for interleaved schedules).")
    units: list[str] = Field(description="IR units in this stage, in execution order.")
    modules: list[str] = Field(description="Module paths (prefixes) in this stage.")
    ranks: list[int] = Field(description="Global ranks that hold this stage.")
    params: NonNegativeInt = Field(description="Parameters of the stage (before TP sharding).")
    memory_bytes: NonNegativeInt = Field(description="Estimated peak memory per device of this stage.")
    memory_breakdown: "MemoryBreakdown"
    fwd_time_s: NonNegativeFloat = Field(description="Forward time of one micro-batch on one device.")
    bwd_time_s: NonNegativeFloat = Field(description="Backward time (incl. recompute) of one micro-batch.")


class MemoryBreakdown(Strict):
    params: NonNegativeInt = Field(description="Bytes of parameters (compute copy).")
    grads: NonNegativeInt = Field(description="Bytes of gradients.")
    optimizer: NonNegativeInt = Field(description="Bytes of optimizer state (incl. fp32 master weights).")
    activations: NonNegativeInt = Field(description="Bytes of activations saved for backward, peak over in-flight micro-batches.")
    overhead: NonNegativeInt = Field(0, description="Framework, communication buffers and reserved memory.")

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.overhead


class CommTime(Strict):
    dp: NonNegativeFloat = Field(0.0, description="Exposed data-parallel gradient sync per step (s).")
    dp_in_forward: NonNegativeFloat = Field(
        0.0, description="Of dp, what the forward passes hold: FSDP2's parameter all-gathers before each "
        "micro-batch's forward and half its per-unit work (ZeRO-2/3) (s).")
    dp_in_backward: NonNegativeFloat = Field(
        0.0, description="Of dp, what every micro-batch's backward holds besides the gradient sync: ZeRO-3's "
        "re-gathers and the other half of FSDP2's per-unit work (s).")
    dp_in_update: NonNegativeFloat = Field(
        0.0, description="Of dp, what the optimizer step holds: ZeRO-1's broadcast of the updated parameters (s). "
        "The rest of dp is the gradient sync proper.")
    tp: NonNegativeFloat = Field(0.0, description="Tensor-parallel collectives per step on the critical path (s).")
    pp: NonNegativeFloat = Field(0.0, description="Pipeline point-to-point per step on the critical path (s).")


class Estimate(Strict):
    step_time_s: NonNegativeFloat
    samples_per_s: NonNegativeFloat
    tokens_per_s: NonNegativeFloat
    tflops_per_device: NonNegativeFloat = Field(description="Model FLOPs (no recompute) per second per device / 1e12.")
    mfu: NonNegativeFloat = Field(description="Model FLOPs utilisation: achieved model FLOP/s over peak.")
    memory_per_device_bytes: NonNegativeInt = Field(description="Peak over stages.")
    memory_breakdown: MemoryBreakdown = Field(description="Of the stage with the highest peak.")
    comm_time_s: CommTime
    bubble_fraction: NonNegativeFloat = Field(description="Pipeline idle time over step time.")
    update_time_s: NonNegativeFloat = Field(
        0.0, description="Per step after the micro-batches: the optimizer update, the sum of tied gradients and "
        "the runtime's loss and memory all-gather (s); part of step_time_s.")
    time_to_train_s: NonNegativeFloat | None = Field(None, description="For training.tokens, if given.")
    energy_kwh: NonNegativeFloat | None = Field(None, description="Devices x power x time, if power_w is known.")
    cost: NonNegativeFloat | None = Field(None, description="Devices x hours x price, if price_per_hour is known.")


class Alternative(Strict):
    rank: PositiveInt = Field(description="1 = the runner-up.")
    layout: str = Field(description="Compact layout, e.g. 'dp=16 tp=8 pp=8 mb=1 1f1b zero=1 recompute=full'.")
    step_time_s: NonNegativeFloat | None
    memory_per_device_bytes: NonNegativeInt
    fits: bool
    reason: str = Field(description="Why it lost, e.g. '12% slower: DP all-reduce crosses nodes'.")


class ModelSummary(Strict):
    params: NonNegativeInt = Field(description="Parameters of the whole model (tied ones once).")
    flops_per_sample: NonNegativeFloat = Field(description="Training FLOPs (forward + backward, no recompute) per sample.")
    layers: NonNegativeInt = Field(0, description="Repeated blocks (transformer layers), 0 if none.")


class SearchStats(Strict):
    """Deterministic facts about the search (wall time lives in report.json, not in the plan)."""

    candidates: NonNegativeInt = Field(description="Layouts enumerated.")
    evaluated: NonNegativeInt = Field(description="Layouts costed (the rest were pruned by bounds).")
    feasible: NonNegativeInt = Field(description="Evaluated layouts that fit in memory.")


class Plan(Strict):
    version: Literal[1] = Field(PLAN_VERSION, description="Plan format version.")
    spec: Spec = Field(description="The spec this plan was made from (cluster expanded).")
    spec_hash: str = Field(description="sha256 of the canonical JSON of the spec.")
    mesh: Mesh
    micro_batch: PositiveInt = Field(description="Samples per micro-batch per replica.")
    num_microbatches: PositiveInt = Field(description="Micro-batches per step per replica.")
    schedule: Schedule
    virtual_stages: PositiveInt = Field(1, description="Model chunks per pipeline rank.")
    zero: Literal[0, 1, 2, 3]
    recompute: Recompute
    sequence_parallel: bool
    allreduce: AllReduce
    sync: SyncMode
    compression: Compression
    comm: CommSpec = Field(
        default_factory=CommSpec,
        description="Options of the all-reduce, consistency mode and compression (local_size resolved from the cluster).",
    )
    tp_styles: dict[str, TPStyle] = Field(
        default_factory=dict, description="Tensor-parallel style per module path (empty when tp = 1)."
    )
    stages: list[StagePlan]
    model: ModelSummary
    estimate: Estimate
    search: SearchStats | None = Field(None, description="None for hand-written plans.")
    alternatives: list[Alternative] = Field(default_factory=list)
    collective_timeout_s: PositiveInt = Field(600, description="Timeout of every collective in the run.")
    notes: list[str] = Field(default_factory=list, description="Decisions the planner wants a person to read.")

    @property
    def ps_servers_dedicated(self) -> int:
        """Server-only ranks after the mesh (``allreduce: ps`` with ``comm.ps_placement: dedicated``), else 0."""
        if self.allreduce == "ps" and self.comm.ps_placement == "dedicated":
            return self.comm.ps_servers or 0
        return 0

    @property
    def world_size(self) -> int:
        """Processes of the run: the mesh's (workers) and any dedicated parameter servers (ranks after them)."""
        return self.mesh.world_size + self.ps_servers_dedicated

    @model_validator(mode="after")
    def _consistent(self) -> "Plan":
        problems = []
        if self.micro_batch * self.num_microbatches * self.mesh.dp != self.spec.training.global_batch:
            problems.append(
                f"micro_batch ({self.micro_batch}) x num_microbatches ({self.num_microbatches}) x dp "
                f"({self.mesh.dp}) must equal training.global_batch ({self.spec.training.global_batch})"
            )
        if self.world_size != self.spec.cluster.world_size:
            servers = f" + {self.ps_servers_dedicated} dedicated parameter servers" if self.ps_servers_dedicated else ""
            problems.append(
                f"mesh pp x dp x tp = {self.mesh.world_size} devices{servers} but the cluster has "
                f"{self.spec.cluster.world_size}"
            )
        if len(self.stages) != self.mesh.pp * self.virtual_stages:
            problems.append(f"expected {self.mesh.pp * self.virtual_stages} stages (pp x virtual_stages), got {len(self.stages)}")
        if self.spec_hash != spec_hash(self.spec):
            problems.append("spec_hash does not match the spec: the plan was edited; re-plan it")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def spec_hash(spec: Spec) -> str:
    """sha256 of the spec's canonical JSON (sorted keys, no whitespace)."""
    data = spec.model_dump(mode="json", by_alias=True)
    if spec.parallel.comm == CommSpec():  # specs written before parallel.comm existed keep their hash
        del data["parallel"]["comm"]
    elif spec.parallel.comm.ps_placement == "colocated":  # nor those written before comm.ps_placement
        del data["parallel"]["comm"]["ps_placement"]
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


StagePlan.model_rebuild()
