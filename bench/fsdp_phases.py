"""Where FSDP2's own per-unit work runs: forward or backward (the planner's even split).

The planner puts FSDP2's calibrated per-unit work (``device.fsdp_unit_overhead``: hooks, flat-buffer
copies, resharding) half into the forward and half into the backward when it tells the runtime's
phase timers what to expect (``trainplan.planner.gradient_sync.fsdp_phases``). This times the two
passes apart on the calibration's synthetic network (``op_bench._SyntheticBlock`` × 4 FSDP units,
as ``calibrate_framework.fsdp_unit_time``), every rank training at once:

* ``gather`` = ZeRO-3's step − ZeRO-2's step (one more all-gather per unit);
* per pass, ZeRO-3 under ``set_requires_gradient_sync(False)`` (no reduce-scatter) − the plain
  network − one gather: what FSDP2 adds to that pass besides its collectives.

    .venv/bin/python bench/fsdp_phases.py [--nproc 4] [--rounds 9]

Prints a table (ms per unit, median of the rounds) and a JSON line with the forward's share.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainplan.runtime.calibrate_framework import FSDP_UNITS, fsdp_probe_networks  # noqa: E402
from trainplan.runtime.local_workers import WorkerContext, run_local_workers  # noqa: E402

STEPS = 10  # training steps per timing


def worker(ctx: WorkerContext) -> dict[str, Any]:
    """One rank: the four variants timed per pass, ``rounds`` times; medians in ms per unit."""
    plain, sharded = fsdp_probe_networks()
    x = torch.randn(1, 32, 64)

    def passes(model: torch.nn.Module, sync: bool = True) -> tuple[float, float]:
        if not sync:
            model.set_requires_gradient_sync(False)
        forward = backward = 0.0
        for _ in range(STEPS):
            t0 = time.perf_counter()
            loss = model(x).sum()
            t1 = time.perf_counter()
            loss.backward()
            forward, backward = forward + t1 - t0, backward + time.perf_counter() - t1
        if not sync:
            model.set_requires_gradient_sync(True)
        return forward / STEPS / FSDP_UNITS, backward / STEPS / FSDP_UNITS

    variants = {"plain": lambda: passes(plain), "zero3": lambda: passes(sharded[3]),
                "zero2": lambda: passes(sharded[2]), "nosync": lambda: passes(sharded[3], sync=False)}
    for run in variants.values():
        run()  # FSDP2's lazy initialisation
    rows = []
    for _ in range(ctx.config["rounds"]):
        t = {name: run() for name, run in variants.items()}
        gather = sum(t["zero3"]) - sum(t["zero2"])
        rows.append((gather, t["nosync"][0] - t["plain"][0] - gather, t["nosync"][1] - t["plain"][1] - gather))
    gather, forward, backward = (1e3 * statistics.median(column) for column in zip(*rows))
    return {"rank": ctx.rank, "gather_ms": gather, "hooks_forward_ms": forward, "hooks_backward_ms": backward}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ranks = run_local_workers("bench.fsdp_phases:worker", args.nproc, backend="gloo", config={"rounds": args.rounds},
                              threads=1, timeout_s=600)
    print("| rank | gather (ms/unit) | hooks in forward | hooks in backward | forward's share |")
    print("|---|---|---|---|---|")
    for r in ranks:
        total = r["hooks_forward_ms"] + r["hooks_backward_ms"]
        share = r["hooks_forward_ms"] / total if total > 0 else None
        r["forward_share"] = share
        print(f"| {r['rank']} | {r['gather_ms']:.3f} | {r['hooks_forward_ms']:.3f} | {r['hooks_backward_ms']:.3f} | "
              f"{'—' if share is None else f'{share:.2f}'} |")
    shares = [r["forward_share"] for r in ranks if r["forward_share"] is not None]
    print(json.dumps({"bench": "fsdp_phases", "nproc": args.nproc, "rounds": args.rounds, "units": FSDP_UNITS,
                      "forward_share_median": statistics.median(shares) if shares else None, "ranks": ranks}))


if __name__ == "__main__":
    main()
