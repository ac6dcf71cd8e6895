"""Consistency modes against a straggler: samples/s and the loss reached within a wall-clock budget.

Modes (4 gloo processes, one replica each, a small GPT, Adam): ``sync`` (DDP), the parameter
server ``ps`` synchronous and ``async`` with staleness bound s = 0, 2, 8, local SGD with H = 4, and
the synchronous parameter server on dedicated server ranks (``ps sync 2+2 ded.``: of the 4
processes, 2 are workers with twice the rows each and 2 only serve).
Each runs twice: as is, and with a 2x straggler — rank 1 sleeps every step as long as the median
synchronous step takes (``--straggler 1:T``), so it needs about twice as long per step.

Per run: samples/s = the samples every replica completed within the ``--budget`` seconds (each by
its own cumulative step times) over the budget, and the loss after the budget: the mean loss over
replicas at the last step rank 0 completed within it (asynchronous workers may be at other steps
by then). Every worker runs ``--steps`` steps; choose a budget shorter than the slowest run.
Prints a table and a JSON line. Plans come from the planner with the mode fixed in the spec.

    .venv/bin/python bench/sync_modes.py [--steps 40] [--budget 2.0] [--nproc 4]

On a shared machine numbers move with other people's load; run it more than once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

from trainplan import api
from trainplan.ir.plan import Plan
from trainplan.runtime.launch import launch_sweep, straggler_args

MODEL = {"layers": 2, "hidden": 64, "heads": 4, "vocab": 256, "seq_len": 32}
MODES: dict[str, dict[str, Any]] = {
    "sync": {},
    "ps sync": {"allreduce": "ps"},
    "async s=0": {"allreduce": "ps", "sync": "async", "comm": {"staleness": 0}},
    "async s=2": {"allreduce": "ps", "sync": "async", "comm": {"staleness": 2}},
    "async s=8": {"allreduce": "ps", "sync": "async", "comm": {"staleness": 8}},
    "local SGD H=4": {"sync": "local_sgd", "comm": {"local_sgd_period": 4}},
}
DEDICATED = "ps sync 2+2 ded."  # with --nproc N: N/2 workers and N/2 dedicated servers


def modes(nproc: int) -> dict[str, dict[str, Any]]:
    if nproc < 2:
        return dict(MODES)
    servers = nproc // 2
    return {**MODES, DEDICATED.replace("2+2", f"{nproc - servers}+{servers}"): {
        "allreduce": "ps", "comm": {"ps_servers": servers, "ps_placement": "dedicated"}}}


def plan_for(mode: dict[str, Any], nproc: int, steps: int) -> Plan:
    comm = mode.get("comm", {})
    workers = nproc - comm["ps_servers"] if comm.get("ps_placement") == "dedicated" else nproc
    spec = api.spec_from_dict({
        "name": "sync-modes",
        "model": {"catalogue": "gpt", "args": MODEL},
        "training": {"global_batch": 4 * nproc, "steps": steps, "optimizer": "adam", "lr": 3e-3, "seed": 0},
        "cluster": {"preset": "cpu-local", "devices_per_node": nproc},
        "parallel": {"dp": workers, "tp": 1, "pp": 1, "zero": 0, "compression": "none", "allreduce": "native",
                     "sync": "sync", **mode},
    })
    plan, _ = api.plan(spec)
    return plan


def read(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return lines, json.loads((out / "summary.json").read_text())


def result(out: Path, plan: Plan, nproc: int, budget: float) -> dict[str, Any]:
    """Samples every replica completed within ``budget`` seconds (each by its own step times; DDP
    ranks run in lockstep, so rank 0's times stand for all) per second, and the loss then."""
    lines, summary = read(out)
    rank_times = summary.get("rank_step_times_s") or [[m["step_time_s"] for m in lines]] * plan.mesh.dp
    per_replica = plan.spec.training.global_batch // plan.mesh.dp  # dedicated servers hold no replica
    done = [sum(1 for t in _cumulative(times) if t <= budget) for times in rank_times]
    within = lines[max(done[0] - 1, 0)]
    return {"samples_per_s": sum(done) * per_replica / budget, "steps_in_budget": done,
            "loss_at_budget": within["loss"], "final_loss": lines[-1]["loss"],
            "median_step_s": statistics.median(m["step_time_s"] for m in lines[1:]),
            "staleness_max": max((m.get("staleness_max", 0) for m in lines), default=0)}


def _cumulative(times: list[float]) -> list[float]:
    out, total = [], 0.0
    for t in times:
        total += t
        out.append(total)
    return out


def sweep(plans: dict[str, Plan], root: Path, nproc: int, straggler: tuple[int, float] | None) -> Path:
    outs = [root / name.replace(" ", "_").replace("=", "") for name in plans]
    code = launch_sweep(list(plans.values()), nproc=nproc, out_dirs=outs, run_dir=root / "run",
                        worker_args=straggler_args(straggler, nproc))
    if code != 0:
        raise SystemExit((root / "run" / "error.txt").read_text())
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--budget", type=float, default=2.0, help="wall-clock seconds for 'loss after budget'")
    parser.add_argument("--nproc", type=int, default=4)
    args = parser.parse_args()
    plans = {name: plan_for(mode, args.nproc, args.steps) for name, mode in modes(args.nproc).items()}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = sweep(plans, Path(tmp) / "plain", args.nproc, None)
        for name, plan in plans.items():
            rows.append({"mode": name, "straggler_s": 0.0,
                         **result(plain / name.replace(" ", "_").replace("=", ""), plan, args.nproc, args.budget)})
        delay = rows[0]["median_step_s"]  # rank 1 then takes about twice the synchronous step
        slow = sweep(plans, Path(tmp) / "straggler", args.nproc, (1, delay))
        for name, plan in plans.items():
            rows.append({"mode": name, "straggler_s": delay,
                         **result(slow / name.replace(" ", "_").replace("=", ""), plan, args.nproc, args.budget)})
    print(f"{'mode':<17} {'straggler':>10} {'samples/s':>10} {'steps in budget':>16} {'loss@budget':>12} "
          f"{'rank-0 step':>12} {'final loss':>11} {'max stale':>10}")
    for r in rows:
        print(f"{r['mode']:<17} {r['straggler_s'] * 1e3:>8.1f}ms {r['samples_per_s']:>10.1f} "
              f"{'/'.join(map(str, r['steps_in_budget'])):>16} {r['loss_at_budget']:>12.4f} "
              f"{r['median_step_s'] * 1e3:>10.1f}ms {r['final_loss']:>11.4f} {r['staleness_max']:>10.0f}")
    print(json.dumps({"bench": "sync_modes", "nproc": args.nproc, "steps": args.steps, "budget_s": args.budget,
                      "model": MODEL, "cpus": os.cpu_count(), "machine": platform.machine(), "rows": rows}))


if __name__ == "__main__":
    main()
