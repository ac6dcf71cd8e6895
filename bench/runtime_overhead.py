"""Overhead of trainplan's runtime: a dp=2 plan against a hand-written DDP script of the same model.

Both train the catalogue GPT on the same synthetic batches with Adam, 2 CPU processes on gloo,
the same threads per process. Ours: ``launch(plan)`` with a hand-written dp=2, ZeRO-0 plan; its
``summary.json`` gives the median step time (steps after the first). The baseline: this file run
under ``torch.distributed.run`` with ``--baseline-worker``: ``init_process_group``, the model, DDP,
Adam and a timed loop, nothing else. Each is repeated; the table shows the median samples/s of
each and their ratio (ours / baseline: 1.0 means no overhead). Then a pp=2 run (GPipe and 1F1B, 4
micro-batches, one sweep) compares each rank's measured pipeline bubble with the planner's schedule
simulator fed the measured stage times. The last line is JSON.

    .venv/bin/python bench/runtime_overhead.py [--repeats 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainplan.ir.loading import validate
from trainplan.ir.plan import Plan, spec_hash
from trainplan.ir.spec import Spec
from trainplan.models import init_parameters, loss_fn, resolve_task, synthetic_batch
from trainplan.models.gpt import GPT, GPTConfig
from trainplan.runtime.launch import default_threads, launch

NPROC = 2
MODEL = {"layers": 4, "hidden": 128, "heads": 4, "vocab": 512, "seq_len": 64}
GLOBAL_BATCH = 16


def spec(steps: int) -> Spec:
    return validate(Spec, {
        "name": "runtime-overhead",
        "model": {"catalogue": "gpt", "args": MODEL},
        "training": {"global_batch": GLOBAL_BATCH, "steps": steps, "optimizer": "adam", "lr": 1e-3, "seed": 0},
        "cluster": {"preset": "cpu-local", "devices_per_node": NPROC},
    })


def dp_plan(s: Spec) -> Plan:
    """A hand-written dp=2 plan: one micro-batch per replica, ZeRO-0 (DDP); the estimate is not used."""
    memory = {"params": 0, "grads": 0, "optimizer": 0, "activations": 0}
    stage = {"index": 0, "units": [], "modules": [], "ranks": list(range(NPROC)), "params": 0, "memory_bytes": 0,
             "memory_breakdown": memory, "fwd_time_s": 0.0, "bwd_time_s": 0.0}
    return Plan.model_validate({
        "spec": s, "spec_hash": spec_hash(s), "mesh": {"pp": 1, "dp": NPROC, "tp": 1},
        "micro_batch": GLOBAL_BATCH // NPROC, "num_microbatches": 1, "schedule": "1f1b", "zero": 0,
        "recompute": "none", "sequence_parallel": False, "allreduce": "native", "sync": "sync",
        "compression": "none", "stages": [stage], "model": {"params": 0, "flops_per_sample": 0.0},
        "estimate": {"step_time_s": 0.0, "samples_per_s": 0.0, "tokens_per_s": 0.0, "tflops_per_device": 0.0,
                     "mfu": 0.0, "memory_per_device_bytes": 0, "memory_breakdown": memory, "comm_time_s": {},
                     "bubble_fraction": 0.0},
    })


def pp_plan(s: Spec, schedule: str, microbatches: int) -> Plan:
    """The planner's pp=2 plan of the model with the schedule and micro-batch count fixed (one replica)."""
    from trainplan import api

    fixed = {"pp": 2, "dp": 1, "tp": 1, "micro_batch": GLOBAL_BATCH // microbatches, "schedule": schedule,
             "zero": 0, "recompute": "none"}
    return api.plan(s.model_copy(update={"parallel": s.parallel.model_copy(update=fixed)}))[0]


def pipeline_bubbles(steps: int, folder: Path, microbatches: int = 4) -> list[dict[str, object]]:
    """Each pp=2 schedule's measured bubble next to the schedule simulator's, fed the measured stage times.

    The runtime measures, per rank and step, the time inside its stage's forwards and backwards and
    the idle rest of the micro-batch phase (trainplan.runtime.measure). The planner's event
    simulator (trainplan.planner.schedule.simulate) is given each rank's measured per-micro-batch
    forward and backward times and no transfer time; its idle time per rank is the predicted bubble.
    """
    from trainplan.planner.schedule import compiled, simulate
    from trainplan.runtime.launch import launch_sweep

    schedules = ["gpipe", "1f1b"]
    outs = [folder / f"pp2-{name}" for name in schedules]
    plans = [pp_plan(spec(steps), name, microbatches) for name in schedules]
    if launch_sweep(plans, nproc=2, out_dirs=outs, run_dir=folder / "pp2") != 0:
        raise SystemExit((folder / "pp2" / "error.txt").read_text())
    rows = []
    for name, out in zip(schedules, outs):
        ranks = json.loads((out / "summary.json").read_text())["time"]["ranks"]
        phase = {r["rank"]: {k: v["measured"] for k, v in r["phases"].items()} for r in ranks}
        fwd = [[phase[r]["forward"] / microbatches] for r in (0, 1)]
        bwd = [[phase[r]["backward"] / microbatches] for r in (0, 1)]
        timeline = simulate(compiled(name, 2, microbatches), fwd, bwd)
        for r in (0, 1):
            predicted = timeline.makespan - timeline.busy[r]
            rows.append({"schedule": name, "rank": r, "measured_bubble_s": phase[r]["bubble"],
                         "predicted_bubble_s": predicted, "ratio": phase[r]["bubble"] / predicted if predicted else None})
    return rows


def ours(steps: int, folder: Path) -> float:
    """Samples/s of the runtime (median step time of the steps after the first)."""
    if launch(dp_plan(spec(steps)), nproc=NPROC, out_dir=folder) != 0:
        raise SystemExit((folder / "error.txt").read_text())
    return GLOBAL_BATCH / json.loads((folder / "summary.json").read_text())["measured_step_time_s"]


def baseline(steps: int, folder: Path) -> float:
    """Samples/s of the hand-written DDP script."""
    out = folder / "baseline.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(NPROC),
               __file__, "--baseline-worker", "--steps", str(steps), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(default_threads(NPROC))}
    subprocess.run(command, check=True, env=env, capture_output=True)
    return GLOBAL_BATCH / json.loads(out.read_text())["median_step_time_s"]


def baseline_worker(steps: int, out: Path) -> None:
    """The hand-written script: the same model, data, optimizer and threads, plain DDP."""
    torch.set_num_threads(default_threads(NPROC))
    torch.set_flush_denormal(True)  # as trainplan's CPU workers do, so the ratio measures the runtime's overhead
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank = dist.get_rank()
    s = spec(steps)
    model = GPT(GPTConfig.model_validate(MODEL))
    init_parameters(model, s.training.seed)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=s.training.lr)
    task, criterion = resolve_task(s.model, s.task), loss_fn(resolve_task(s.model, s.task))
    rows = slice(rank * GLOBAL_BATCH // NPROC, (rank + 1) * GLOBAL_BATCH // NPROC)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        inputs, targets = synthetic_batch(task, GLOBAL_BATCH, s.training.seed, step)
        loss = criterion(ddp(inputs[rows]), targets[rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reported = loss.detach().clone()
        dist.all_reduce(reported)  # ours reduces the loss for its metrics too
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.write_text(json.dumps({"median_step_time_s": statistics.median(times[1:])}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_worker:
        baseline_worker(args.steps, args.out)
        # After the DDP module is gone: destroying the group under a live DDP reducer can hang.
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)
    runs: dict[str, list[float]] = {"trainplan": [], "hand-written DDP": []}
    with tempfile.TemporaryDirectory(prefix="trainplan-overhead-") as tmp:
        for i in range(args.repeats):  # alternate, so drifts in machine load hit both alike
            runs["trainplan"].append(ours(args.steps, Path(tmp) / f"ours-{i}"))
            runs["hand-written DDP"].append(baseline(args.steps, Path(tmp)))
        bubbles = pipeline_bubbles(args.steps, Path(tmp))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratio = medians["trainplan"] / medians["hand-written DDP"]
    print(f"GPT {MODEL}, global batch {GLOBAL_BATCH}, dp={NPROC} on gloo, {args.steps} steps, {args.repeats} repeats")
    print(f"{'runner':<18} {'samples/s (median)':>19}  runs")
    for name, values in runs.items():
        print(f"{name:<18} {medians[name]:>19.1f}  {', '.join(f'{v:.1f}' for v in values)}")
    print(f"ratio trainplan / hand-written: {ratio:.3f}")
    print("\npp=2, 4 micro-batches: bubble per step (s), measured vs simulated from the measured stage times")
    print(f"{'schedule':<8} {'rank':>4} {'measured':>9} {'simulated':>10} {'ratio':>6}")
    for row in bubbles:
        ratio_text = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        print(f"{row['schedule']:<8} {row['rank']:>4} {row['measured_bubble_s']:>9.4f} {row['predicted_bubble_s']:>10.4f} "
              f"{ratio_text:>6}")
    print(json.dumps({"bench": "runtime_overhead", "nproc": NPROC, "model": MODEL, "global_batch": GLOBAL_BATCH,
                      "steps": args.steps, "repeats": args.repeats,
                      "samples_per_s": {k: round(v, 2) for k, v in medians.items()}, "ratio": round(ratio, 4),
                      "pp2_bubbles": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
                                      for row in bubbles]}))


if __name__ == "__main__":
    main()
