"""Planning speed: trace + annotate + full search for GPT-3 175B on 1024 A100s and a 1T GPT on 3072.

Each case runs in a fresh subprocess (cold imports included, as a user would see it) and reports
wall time and peak RSS. Prints a table and a final JSON line. ``python bench/plan_speed.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

CASES = {
    "gpt3-175b / 1024 x A100": {
        "name": "gpt3-175b",
        "model": {"catalogue": "gpt", "args": {"layers": 96, "hidden": 12288, "heads": 96, "vocab": 51200, "seq_len": 2048}},
        "training": {"global_batch": 1536, "precision": "bf16", "optimizer": "adam"},
        "cluster": {"preset": "a100-80g", "nodes": 128},
    },
    "gpt-1t / 3072 x A100": {
        "name": "gpt-1t",
        "model": {"catalogue": "gpt", "args": {"layers": 128, "hidden": 25600, "heads": 160, "vocab": 51200, "seq_len": 2048}},
        "training": {"global_batch": 3072, "precision": "bf16", "optimizer": "adam"},
        "cluster": {"preset": "a100-80g", "nodes": 384},
    },
}

CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from trainplan import api
spec = api.spec_from_dict(json.loads(sys.argv[1]))
t0 = time.perf_counter()
graph = api.trace(spec)
t1 = time.perf_counter()
from trainplan.planner import plan_from_graph
plan, search_s = plan_from_graph(api.resolve(spec), graph)
end = time.perf_counter()
print(json.dumps({"total_s": end - start, "import_s": t0 - start, "trace_s": t1 - t0, "search_s": search_s,
                  "candidates": plan.search.candidates, "evaluated": plan.search.evaluated,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "mesh": [plan.mesh.dp, plan.mesh.tp, plan.mesh.pp], "step_time_s": plan.estimate.step_time_s}))
"""


def run(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    results = {name: run(spec) for name, spec in CASES.items()}
    print(f"{'case':<26} {'total s':>8} {'import':>7} {'trace':>7} {'search':>7} {'evaluated':>10} {'RSS MiB':>8}  mesh dp/tp/pp")
    for name, r in results.items():
        print(f"{name:<26} {r['total_s']:>8.2f} {r['import_s']:>7.2f} {r['trace_s']:>7.2f} {r['search_s']:>7.2f} "
              f"{r['evaluated']:>5}/{r['candidates']:<6} {r['peak_rss_mib']:>7.0f}  {r['mesh']}")
    print(json.dumps({"bench": "plan_speed", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
