"""Bus bandwidth of every all-reduce algorithm on gloo, world sizes 2 and 4, 1 KiB .. 64 MiB.

Bus bandwidth is nccl-tests' definition (doc/PERFORMANCE.md): ``busbw = algbw · 2(n-1)/n`` with
``algbw = bytes / time``, comparable across world sizes and with a link's bandwidth. Each point is
the median over repeats of the slowest rank's time (see trainplan/runtime/collectives/timing.py).
Prints a table per world size and a final JSON line with every point, our ring over gloo's native
all-reduce at the largest size (target >= 0.8), and the ring/tree crossover size: the smallest
size from which the ring is at least as fast as the tree at every larger size measured.

    .venv/bin/python bench/collectives.py [--worlds 2 4] [--repeats 5] [--big] [--max-size 64MiB]

With ``--cluster FILE`` (a cluster description, e.g. written by ``trainplan calibrate``), each
point also gets the cost model's prediction from that cluster's intra-node link — the alpha-beta
formulas of :mod:`trainplan.planner.cost.comm` the planner uses — and the table adds
predicted / measured; the JSON line gets the median and worst ratio per algorithm.

On a shared machine the numbers move with other people's load; run it more than once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from trainplan.runtime.calibrate import bus_bandwidth
from trainplan.runtime.local_workers import run_local_workers

KiB, MiB = 2**10, 2**20
TARGET = "trainplan.runtime.collectives.timing:bench_worker"


def sizes(max_bytes: int) -> list[int]:
    """1 KiB, 4 KiB, ... up to ``max_bytes`` (powers of 4)."""
    out, s = [], KiB
    while s <= max_bytes:
        out.append(s)
        s *= 4
    return out


def label(nbytes: int) -> str:
    return f"{nbytes // MiB} MiB" if nbytes >= MiB else f"{nbytes // KiB} KiB"


def measure(world: int, byte_sizes: list[int], repeats: int, threads: int) -> list[dict[str, Any]]:
    cfg = {"sizes": byte_sizes, "repeats": repeats, "warmup": 1}
    results = run_local_workers(TARGET, world, backend="gloo", config=cfg, threads=threads, timeout_s=1800,
                                group_timeout_s=600, label=f"bench/collectives.py with {world} ranks")
    rows = results[0]["rows"]
    for r in rows:
        r["world"] = world
        r["busbw_gb_s"] = bus_bandwidth(r["bytes"], r["median_s"], world) / 1e9
    return rows


def crossover(rows: list[dict[str, Any]], fast: str = "ring", slow: str = "tree") -> int | None:
    """Smallest size from which ``fast`` takes at most ``slow``'s time at every larger size."""
    by = {(r["variant"]["name"], r["bytes"]): r["median_s"] for r in rows}
    points = sorted({r["bytes"] for r in rows})
    best = None
    for nbytes in reversed(points):
        if by[(fast, nbytes)] > by[(slow, nbytes)]:
            break
        best = nbytes
    return best


def predicted_s(variant: dict[str, Any], nbytes: int, world: int, link: Any) -> float:
    """The cost model's time for one measured point: every rank on one node, so one link level.

    gloo's own all-reduce is modelled as the planner models a backend's native choice (the faster
    of ring and tree); hierarchical with ``L`` ranks per "node" as reduce-scatter inside groups of
    ``L``, a ring among the ``world / L`` groups, and an all-gather, all on the same link.
    """
    from trainplan.planner.cost import comm

    algo = variant["algo"]
    if algo == "hierarchical":
        local = variant["options"]["local_size"]
        return comm.hierarchical_allreduce_time_s(nbytes, local, world // local, link, link)
    return comm.allreduce_time_s(nbytes, world, link, algo)


def add_predictions(rows: list[dict[str, Any]], cluster_path: str) -> None:
    from trainplan.ir.cluster import Cluster
    from trainplan.ir.loading import load

    link = load(Cluster, cluster_path).intra_node
    for r in rows:
        r["predicted_s"] = predicted_s(r["variant"], r["bytes"], r["world"], link)


def prediction_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per world size and algorithm: median and worst (furthest from 1) predicted / measured time."""
    out: dict[str, Any] = {}
    for r in rows:
        out.setdefault(str(r["world"]), {}).setdefault(r["variant"]["name"], []).append(r["predicted_s"] / r["median_s"])
    return {w: {a: {"median": round(statistics.median(v), 3), "worst": round(max(v, key=lambda x: abs(math.log(x))), 3)}
                for a, v in algos.items()} for w, algos in out.items()}


def print_table(world: int, rows: list[dict[str, Any]]) -> None:
    names = list(dict.fromkeys(r["variant"]["name"] for r in rows))
    predicted = all("predicted_s" in r for r in rows)
    what = " / predicted over measured" if predicted else ""
    print(f"\nworld size {world}: median time (ms) / bus bandwidth (GB/s){what}")
    width = 32 if predicted else 24
    print(f"{'size':>8} " + " ".join(f"{n:>{width}}" for n in names))
    for nbytes in sorted({r["bytes"] for r in rows}):
        cells = {r["variant"]["name"]: r for r in rows if r["bytes"] == nbytes}
        print(f"{label(nbytes):>8} " + " ".join(
            f"{cells[n]['median_s'] * 1e3:11.3f} / {cells[n]['busbw_gb_s']:8.3f}"
            + (f" / {cells[n]['predicted_s'] / cells[n]['median_s']:5.2f}" if predicted else "") for n in names))


def summary(rows: list[dict[str, Any]], worlds: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"ring_over_native_at_max": {}, "ring_tree_crossover_bytes": {}}
    for w in worlds:
        mine = [r for r in rows if r["world"] == w]
        top = max(r["bytes"] for r in mine)
        bw = {r["variant"]["name"]: r["busbw_gb_s"] for r in mine if r["bytes"] == top}
        out["ring_over_native_at_max"][str(w)] = {"bytes": top, "ratio": round(bw["ring"] / bw["native"], 3)}
        out["ring_tree_crossover_bytes"][str(w)] = crossover(mine)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=5, help="samples per point (x4 up to 64 KiB)")
    parser.add_argument("--max-size", type=int, default=64 * MiB, help="largest message in bytes")
    parser.add_argument("--big", action="store_true", help="also 256 MiB")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--cluster", help="cluster YAML (e.g. from `trainplan calibrate`): add the cost model's predictions")
    args = parser.parse_args(argv)
    byte_sizes = sizes(256 * MiB if args.big else args.max_size)
    start, rows = time.monotonic(), []
    for world in args.worlds:
        mine = measure(world, byte_sizes, args.repeats, args.threads)
        if args.cluster:
            add_predictions(mine, args.cluster)
        print_table(world, mine)
        rows += mine
    result = {"bench": "collectives", "backend": "gloo", "torch": torch.__version__, "host": platform.node(),
              "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
              "threads_per_rank": args.threads, "repeats": args.repeats, "wall_s": round(time.monotonic() - start, 1),
              **summary(rows, args.worlds),
              **({"cluster": args.cluster, "predicted_over_measured": prediction_summary(rows)} if args.cluster else {}),
              "points": [{"world": r["world"], "algo": r["variant"]["name"], "bytes": r["bytes"],
                          "median_ms": round(r["median_s"] * 1e3, 4), "busbw_gb_s": round(r["busbw_gb_s"], 4),
                          **({"predicted_ms": round(r["predicted_s"] * 1e3, 4)} if "predicted_s" in r else {})}
                         for r in rows]}
    print()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
