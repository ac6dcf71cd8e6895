"""Hand-written plans for runtime tests: a valid :class:`Plan` for a spec and a layout.

The planner is not involved: the layout (dp, tp, pp, micro-batch, schedule, ZeRO, recompute,
sequence parallelism, stage modules, tensor-parallel styles) is given, the stage boundaries
default to an even split of the model's blocks, and the estimate — required by the schema,
unused by the runtime — is zero.
"""

from __future__ import annotations

from typing import Any

import torch

from trainplan.ir.loading import validate
from trainplan.ir.plan import Plan, spec_hash
from trainplan.ir.spec import CommSpec, Spec
from trainplan.models import build_model

ZERO_MEMORY = {"params": 0, "grads": 0, "optimizer": 0, "activations": 0}
ZERO_ESTIMATE = {
    "step_time_s": 0.0, "samples_per_s": 0.0, "tokens_per_s": 0.0, "tflops_per_device": 0.0, "mfu": 0.0,
    "memory_per_device_bytes": 0, "memory_breakdown": ZERO_MEMORY, "comm_time_s": {}, "bubble_fraction": 0.0,
}

GPT_TP_STYLES = {
    "wte": "vocab",
    "layers.*.attn.q": "colwise",
    "layers.*.attn.k": "colwise",
    "layers.*.attn.v": "colwise",
    "layers.*.attn.proj": "rowwise",
    "layers.*.mlp.fc": "colwise",
    "layers.*.mlp.proj": "rowwise",
    "layers.*.ln_1": "replicate",
    "layers.*.ln_2": "replicate",
    "ln_f": "replicate",
    "lm_head": "colwise",
}


def gpt_spec(world: int, *, layers: int = 4, hidden: int = 32, heads: int = 4, vocab: int = 64, seq_len: int = 16,
             global_batch: int = 8, steps: int = 3, optimizer: str = "adam", precision: str = "fp32",
             tie: bool = True, **training: Any) -> dict[str, Any]:
    """A tiny GPT spec on ``world`` local CPU processes."""
    return {
        "name": "tiny-gpt",
        "model": {"catalogue": "gpt", "args": {"layers": layers, "hidden": hidden, "heads": heads, "vocab": vocab,
                                               "seq_len": seq_len, "tie_embeddings": tie}},
        "training": {"global_batch": global_batch, "steps": steps, "optimizer": optimizer, "precision": precision,
                     "lr": 1e-2, "seed": 3, **training},
        "cluster": {"preset": "cpu-local", "devices_per_node": world},
    }


def mlp_spec(world: int, *, input_dim: int = 12, hidden: int = 24, layers: int = 3, classes: int = 10,
             global_batch: int = 16, steps: int = 3, optimizer: str = "adam", **training: Any) -> dict[str, Any]:
    """A tiny MLP classifier spec on ``world`` local CPU processes."""
    return {
        "name": "tiny-mlp",
        "model": {"catalogue": "mlp", "args": {"input_dim": input_dim, "hidden": hidden, "layers": layers,
                                               "classes": classes}},
        # Explicit: a plan written to YAML spells out task.kind's default ('lm'), which an mlp refuses.
        "task": {"kind": "classification"},
        "training": {"global_batch": global_batch, "steps": steps, "optimizer": optimizer, "lr": 1e-2, "seed": 5,
                     **training},
        "cluster": {"preset": "cpu-local", "devices_per_node": world},
    }


def units(model: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
    """Top-level units of a catalogue model: those before its blocks, the blocks, those after."""
    before: list[str] = []
    blocks: list[str] = []
    after: list[str] = []
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            blocks += [f"{name}.{i}" for i in range(len(child))]
        elif blocks:
            after.append(name)
        else:
            before.append(name)
    return before, blocks, after


def even_stages(spec: Spec, n: int) -> list[list[str]]:
    """``n`` stages: the units before the blocks on the first, after them on the last, blocks split evenly."""
    model = build_model(spec.model, spec.task, device="meta").module
    before, blocks, after = units(model)
    if n == 1:
        return [before + blocks + after]
    if n > len(blocks):
        raise ValueError(f"{n} stages for {len(blocks)} blocks")
    cuts = [round(i * len(blocks) / n) for i in range(n + 1)]
    stages = [blocks[cuts[i]:cuts[i + 1]] for i in range(n)]
    stages[0] = before + stages[0]
    stages[-1] = stages[-1] + after
    return stages


def make_plan(spec: dict[str, Any] | Spec, *, dp: int = 1, tp: int = 1, pp: int = 1, micro_batch: int | None = None,
              schedule: str = "1f1b", virtual_stages: int = 1, zero: int = 0, recompute: str = "none",
              sequence_parallel: bool = False, stages: list[list[str]] | None = None,
              tp_styles: dict[str, str] | None = None, collective_timeout_s: int = 60, allreduce: str = "native",
              sync: str = "sync", compression: str = "none", comm: dict[str, Any] | None = None) -> Plan:
    """A valid plan of ``spec`` with the given layout (micro_batch defaults to one micro-batch per replica)."""
    spec = spec if isinstance(spec, Spec) else validate(Spec, spec)
    per_replica = spec.training.global_batch // dp
    micro_batch = micro_batch or per_replica
    fixed = {"dp": dp, "tp": tp, "pp": pp, "micro_batch": micro_batch, "schedule": schedule,
             "virtual_stages": virtual_stages, "zero": zero, "recompute": recompute,
             "sequence_parallel": sequence_parallel, "allreduce": allreduce, "sync": sync, "compression": compression,
             "comm": CommSpec(**(comm or {}))}
    spec = spec.model_copy(update={"parallel": spec.parallel.model_copy(update=fixed)})
    stage_lists = stages or even_stages(spec, pp * virtual_stages)
    data = {
        "spec": spec, "spec_hash": spec_hash(spec), "mesh": {"pp": pp, "dp": dp, "tp": tp},
        "micro_batch": micro_batch, "num_microbatches": per_replica // micro_batch,
        "schedule": schedule, "virtual_stages": virtual_stages, "zero": zero, "recompute": recompute,
        "sequence_parallel": sequence_parallel, "allreduce": allreduce, "sync": sync, "compression": compression,
        "comm": comm or {}, "tp_styles": tp_styles or {},
        "stages": [_stage(i, modules, pp, dp, tp) for i, modules in enumerate(stage_lists)],
        "model": {"params": 0, "flops_per_sample": 0.0},
        "estimate": ZERO_ESTIMATE,
        "collective_timeout_s": collective_timeout_s,
    }
    return Plan.model_validate(data)


def _stage(index: int, modules: list[str], pp: int, dp: int, tp: int) -> dict[str, Any]:
    rank = index % pp
    ranks = [(rank * dp + d) * tp + t for d in range(dp) for t in range(tp)]
    return {"index": index, "units": modules, "modules": modules, "ranks": ranks, "params": 0, "memory_bytes": 0,
            "memory_breakdown": ZERO_MEMORY, "fwd_time_s": 0.0, "bwd_time_s": 0.0}
