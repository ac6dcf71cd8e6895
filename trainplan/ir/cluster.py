"""The cluster a plan runs on: devices, their memory and speed, and the links between them.

Hardware numbers are data: presets live in ``trainplan/ir/presets/*.yaml`` and a spec may
override any field of one (``cluster: {preset: a100-80g, nodes: 4, device: {memory: "40 GiB"}}``).
Bandwidths are per device and per direction, in bytes/s; latencies in seconds.
"""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import Field, PositiveInt, model_validator

from trainplan.ir.base import Strict
from trainplan.ir.units import Bytes, BytesPerSecond, FlopsPerSecond, Seconds

Dtype = Literal["fp32", "tf32", "bf16", "fp16"]


class OpCost(Strict):
    """Measured time of one eager operator: ``fixed + per_unit · units``, forward and backward.

    ``units`` are the op's output elements (``per: element``) or its forward FLOPs as
    ``torch.utils.flop_counter`` counts them (``per: flop``: matrix products, convolutions,
    attention); the backward's per-unit cost is per *forward* unit. Written by ``trainplan
    calibrate`` (:mod:`trainplan.runtime.op_bench`); the cost model sums it over a traced graph's
    nodes (:mod:`trainplan.planner.cost.ops`).
    """

    per: Literal["element", "flop"] = Field(description="What ``units`` counts: output elements or forward FLOPs.")
    fwd_fixed_s: Seconds = Field(0.0, description="Forward seconds per call, independent of size.")
    fwd_per_unit_s: Seconds = Field(0.0, description="Forward seconds per unit.")
    bwd_fixed_s: Seconds = Field(0.0, description="Backward seconds per call (its autograd node), independent of size.")
    bwd_per_unit_s: Seconds = Field(0.0, description="Backward seconds per forward unit.")


class TPOverhead(Strict):
    """Framework time of tensor parallelism beyond compute and collectives: DTensor's dispatch around
    each sharded layer, the vocabulary-parallel loss and the optimizer's update of each DTensor
    parameter. Measured by ``trainplan calibrate`` (:func:`trainplan.runtime.calibrate_framework.tp_overhead`)
    at one device's full speed, like ``op_costs`` (the planner divides both by ``compute_share``);
    zeros (the presets) leave it out."""

    module_fwd_s: Seconds = Field(0.0, description="Forward seconds per tensor-parallel layer and micro-batch.")
    module_bwd_s: Seconds = Field(0.0, description="Backward seconds per tensor-parallel layer and micro-batch.")
    loss_fwd_s: Seconds = Field(0.0, description="Forward seconds of the vocabulary-parallel cross-entropy per micro-batch.")
    loss_bwd_s: Seconds = Field(0.0, description="Backward seconds of the vocabulary-parallel cross-entropy per micro-batch.")
    param_step_s: dict[str, Seconds] = Field(
        default_factory=dict, description="Per optimizer ('adam', 'adamw', 'sgd'): seconds per DTensor parameter "
        "tensor and step, beyond the same update on a plain tensor.")


class Device(Strict):
    name: str = Field(description="Device model, e.g. 'A100-SXM4-80GB'.")
    memory: Bytes = Field(description="Memory per device: bytes or a string like '80 GiB'.")
    peak_flops: dict[Dtype, FlopsPerSecond] = Field(
        description="Dense peak FLOP/s per dtype (vendor datasheet, no sparsity)."
    )
    memory_bandwidth: BytesPerSecond | None = Field(
        None,
        description="Achievable device memory (HBM/DRAM) bandwidth, bytes/s (what a streaming copy "
        "reaches, about 80% of the datasheet figure on GPUs); the cost model's roofline uses it for "
        "memory-bound GEMMs and element-wise operators. None treats everything as compute-bound.",
    )
    kernel_launch: Seconds = Field(
        0.0,
        description="Fixed cost per kernel (launch latency and tail), seconds; it makes small "
        "micro-batches and thin tensor-parallel shards slower than their FLOPs alone suggest.",
    )
    efficiency: float = Field(
        0.75,
        gt=0,
        le=1,
        description="Fraction of peak that large GEMMs achieve in practice; the cost model "
        "scales it down for small GEMMs.",
    )
    memory_reserved: Bytes = Field(
        0,
        description="Memory the framework and libraries hold before any tensor exists "
        "(CUDA context, NCCL buffers, allocator fragmentation).",
    )
    compute_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of its own speed a device keeps while every device of the node trains at "
        "once: CPU worker processes that outnumber the cores are time-sliced, and in lockstep training "
        "each step waits for the worst-served one (`trainplan calibrate` measures it with a synthetic "
        "training step, at most cores / (processes x threads)); the measured operator costs "
        "(op_costs) are divided by it.",
    )
    pace_reference_s: Seconds | None = Field(
        None,
        description="Seconds of the lockstep probe's synthetic training step on one worker alone when this "
        "cluster was calibrated (`trainplan calibrate`, CPU). `trainplan calibrate --refresh` times it again "
        "and scales the measured costs by the ratio, so that a calibration follows a shared machine's "
        "current speed; None: not measured.",
    )
    collective_wait_s: Seconds = Field(
        0.0,
        description="Seconds a blocking collective adds to a training step beyond its time alone, where CPU "
        "worker processes outnumber the cores: a rank that waits in a collective gives its core away and, "
        "once the collective completes, waits for the scheduler to hand one back (a time slice of the "
        "ranks still computing). On gloo the planner charges it once per data-parallel gradient exchange, "
        "per BatchNorm buffer broadcast (DDP, once per micro-batch) and per stage boundary a pipeline's "
        "round trip crosses. Measured by "
        "`trainplan calibrate` (the lockstep probe with and without its collectives); 0 (the presets) "
        "leaves it out.",
    )
    fsdp_unit_overhead: Seconds = Field(
        0.0,
        description="Framework time per FSDP2 unit and micro-batch (forward + backward) beyond its collectives "
        "and compute: hooks, copy-in / copy-out around each all-gather and reduce-scatter, run on the same "
        "cores on a CPU. Measured by `trainplan calibrate` on gloo; 0 (the presets) leaves it out.",
    )
    tp_overhead: TPOverhead = Field(
        default_factory=TPOverhead,
        description="DTensor's own time under tensor parallelism (per layer, loss and parameter tensor), measured by "
        "`trainplan calibrate`; zeros (the presets) leave it out.",
    )
    op_costs: dict[Dtype, dict[str, OpCost]] = Field(
        default_factory=dict,
        description="Measured per-operator costs by compute dtype, from `trainplan calibrate` (op name as "
        "the graph front end records it, e.g. 'linear', 'gelu', 'layer_norm'). When present for a plan's "
        "dtype, a traced model's compute time is the sum of these over its operators instead of FLOPs "
        "over the peak rate; empty (the presets) keeps the roofline.",
    )
    power_w: float | None = Field(None, ge=0, description="Board power in watts, for energy estimates.")
    price_per_hour: float | None = Field(
        None, ge=0, description="Price of one device for one hour, for cost estimates."
    )

    @model_validator(mode="after")
    def _physical(self) -> "Device":
        problems = []
        if self.memory <= self.memory_reserved:
            problems.append(f"memory ({self.memory} bytes) must exceed memory_reserved ({self.memory_reserved} bytes)")
        if self.memory_bandwidth is not None and self.memory_bandwidth <= 0:
            problems.append(f"memory_bandwidth must be positive, got {self.memory_bandwidth}")
        if not self.peak_flops or any(v <= 0 for v in self.peak_flops.values()):
            problems.append(f"peak_flops needs a positive rate for each dtype it lists, got {dict(self.peak_flops)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; fp32 math falls back to tf32 only if fp32 is missing."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]  # type: ignore[index]
        if dtype == "fp32" and "tf32" in self.peak_flops:
            return self.peak_flops["tf32"]
        raise KeyError(dtype)


class Link(Strict):
    bandwidth: BytesPerSecond = Field(
        description="Bytes/s per device per direction: '300 GB/s' or '200 Gb/s'."
    )
    latency: Seconds = Field(description="Per-message latency (alpha), e.g. '5 us'.")
    all_gather_latency: Seconds | None = Field(
        None,
        description="Per ring step latency of torch.distributed's all-gather (FSDP2's parameter gathers, "
        "DTensor, the per-step loss report) where it differs from `latency`; `trainplan calibrate` "
        "measures it (on CPU workers inside FSDP2 training steps, with every process computing). "
        "Empty: `latency`.",
    )
    reduce_scatter_latency: Seconds | None = Field(
        None,
        description="Per ring step latency of torch.distributed's reduce-scatter (FSDP2's gradient "
        "reduction, sequence parallelism) where it differs from `latency`; `trainplan calibrate` measures "
        "it like `all_gather_latency` (gloo's costs about a whole all-reduce). Empty: `latency`.",
    )

    @model_validator(mode="after")
    def _positive(self) -> "Link":
        if self.bandwidth <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth}")
        return self


class Cluster(Strict):
    name: str = Field(description="A label for reports.")
    preset: str | None = Field(None, description="The preset this description started from.")
    nodes: PositiveInt = Field(1, description="Number of nodes (hosts).")
    devices_per_node: PositiveInt = Field(description="Accelerators (or CPU processes) per node.")
    device: Device
    intra_node: Link = Field(description="Link between devices of one node (NVLink/NVSwitch, shared memory).")
    inter_node: Link = Field(
        description="Network between nodes, per device: the node's NIC bandwidth divided among its devices."
    )
    backend: Literal["nccl", "gloo"] = Field("nccl", description="torch.distributed backend.")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def link_for_span(self, span_devices: int) -> Link:
        """The slowest link a group of ``span_devices`` consecutive ranks crosses."""
        return self.intra_node if span_devices <= self.devices_per_node else self.inter_node


def preset_names() -> list[str]:
    root = resources.files("trainplan.ir") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


@cache
def _preset_text(name: str) -> str:
    return (resources.files("trainplan.ir") / "presets" / f"{name}.yaml").read_text()


def preset_dict(name: str) -> dict[str, Any]:
    """The raw description of a preset, for merging overrides into."""
    if name not in preset_names():
        known = ", ".join(preset_names())
        raise ValueError(f"unknown preset {name!r}; known presets: {known}")
    data = yaml.safe_load(_preset_text(name))
    data["preset"] = name
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, recursively for nested mappings; inputs unchanged."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def expand_preset(raw: Any) -> Any:
    """A spec's ``cluster`` mapping with its ``preset`` (if any) expanded and overrides applied."""
    if isinstance(raw, str):
        raw = {"preset": raw}
    if not isinstance(raw, dict) or "preset" not in raw or raw.get("preset") is None:
        return raw
    name = raw["preset"]
    if not isinstance(name, str):
        raise ValueError(f"preset: expected a preset name, got {name!r}")
    overrides = {k: v for k, v in raw.items() if k != "preset"}
    return deep_merge(preset_dict(name), overrides)


def load_preset(name: str, **overrides: Any) -> Cluster:
    return Cluster.model_validate(expand_preset({"preset": name, **overrides}))
