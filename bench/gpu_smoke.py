"""GPU smoke test: a ~1B-parameter bf16 GPT planned for one GPU and trained through the runtime on NCCL.

One process (world size 1) on the first CUDA device, started by the same launcher as `trainplan
run` (torch's elastic agent), planned by the same search for the GPU's cluster preset. Prints
the plan, the measured step time (median after the first step) next to the plan's estimate, and
the model FLOPs utilisation (MFU = model FLOPs per step / step time / the preset's bf16 peak;
Chowdhery et al. 2022, PaLM, Appendix B: recomputation is not counted). Table, then one JSON line.

Without a CUDA GPU it says so and exits 0: CI never needs one.

    .venv/bin/python bench/gpu_smoke.py [--steps 6] [--layers 18] [--out out/gpu-smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from trainplan import api
from trainplan.auto import GPU_PRESETS
from trainplan.ir.loading import validate
from trainplan.ir.spec import Spec
from trainplan.runtime.launch import launch


def gpu_preset() -> str | None:
    name = torch.cuda.get_device_name()
    return next((preset for marker, preset in GPU_PRESETS if marker in name), None)


def spec(layers: int, steps: int, preset: str) -> Spec:
    """GPT with h=2048, 16 heads, s=2048, V=50257: 12·L·h² + (V+s)·h ≈ 1.0B parameters at L=18."""
    return validate(Spec, {
        "name": "gpu-smoke",
        "model": {"catalogue": "gpt", "args": {"layers": layers, "hidden": 2048, "heads": 16, "vocab": 50257,
                                               "seq_len": 2048}},
        "training": {"global_batch": 8, "steps": steps, "precision": "bf16", "optimizer": "adamw",
                     "lr": 1e-4, "seed": 0},
        "cluster": {"preset": preset, "nodes": 1, "devices_per_node": 1},
    })


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--out", type=Path, default=Path("out/gpu-smoke"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU on this machine; nothing to measure (skipped)")
        print(json.dumps({"bench": "gpu_smoke", "skipped": "no CUDA GPU"}))
        return 0
    preset = gpu_preset()
    if preset is None:
        print(f"gpu_smoke: no cluster preset describes {torch.cuda.get_device_name()!r}; add one to trainplan/ir/presets")
        return 1
    started = time.perf_counter()
    plan, _ = api.plan(spec(args.layers, args.steps, preset))
    planning_s = time.perf_counter() - started
    code = launch(plan, nproc=1, out_dir=args.out, steps=args.steps)
    if code != 0:
        print((args.out / "error.txt").read_text(), file=sys.stderr)
        return code
    summary = json.loads((args.out / "summary.json").read_text())
    measured = summary["measured_step_time_s"]
    flops_per_step = plan.model.flops_per_sample * plan.spec.training.global_batch
    peak = plan.spec.cluster.device.peak("bf16")
    row = {
        "bench": "gpu_smoke",
        "device": torch.cuda.get_device_name(),
        "preset": preset,
        "params": plan.model.params,
        "layout": f"mb={plan.micro_batch}x{plan.num_microbatches} zero={plan.zero} recompute={plan.recompute}",
        "planning_s": round(planning_s, 2),
        "measured_step_time_s": measured,
        "estimated_step_time_s": plan.estimate.step_time_s,
        "measured_over_estimated": measured / plan.estimate.step_time_s,
        "measured_mfu": flops_per_step / measured / peak,
        "estimated_mfu": plan.estimate.mfu,
        "max_memory_bytes": summary["max_memory_bytes"],
        "estimated_memory_bytes": plan.estimate.memory_per_device_bytes,
        "final_loss": summary["final_loss"],
    }
    width = max(map(len, row))
    for key, value in row.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
