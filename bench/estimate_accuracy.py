"""Measured vs estimated memory and step time over a matrix of small plans on 4 local processes.

    .venv/bin/python -m trainplan calibrate -o out/cluster.yaml --nproc 4 --quick   # optional, for step time
    .venv/bin/python bench/estimate_accuracy.py [--cluster out/cluster.yaml] [--models gpt,llama,bert,cnn] [--steps 3]

Every model (small catalogue sizes) × layout is planned by the planner with every parallel field
fixed, all plans run in one sweep of 4 gloo workers (``launch_sweep``), and each run's
``summary.json`` (``memory``/``time`` sections, :mod:`trainplan.runtime.measure`) gives per rank
each component's measured value next to the estimate. Printed: one row per plan with the worst
relative error over ranks of each component and of the step time, then a JSON line. Targets
(issue 7): model states exact; activations within 5%; step time within 20% after calibration.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainplan.api import plan, spec_from_dict  # noqa: E402
from trainplan.errors import TrainplanError  # noqa: E402
from trainplan.ir.loading import read_yaml  # noqa: E402
from trainplan.runtime.launch import launch_sweep  # noqa: E402
from trainplan.runtime.parallelize import check_plan  # noqa: E402

MODELS = {
    "gpt": {"catalogue": "gpt", "args": {"layers": 4, "hidden": 64, "heads": 4, "vocab": 128, "seq_len": 32}},
    "llama": {"catalogue": "llama", "args": {"layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 128,
                                             "seq_len": 32, "multiple_of": 16}},
    "bert": {"catalogue": "bert", "args": {"layers": 4, "hidden": 64, "heads": 4, "vocab": 128, "seq_len": 32}},
    "cnn": {"catalogue": "cnn", "args": {"classes": 10}},
}
BASE = {"tp": 1, "pp": 1, "micro_batch": 1, "schedule": "1f1b", "virtual_stages": 1, "zero": 0, "recompute": "none",
        "sequence_parallel": False, "allreduce": "native", "sync": "sync", "compression": "none"}
LAYOUTS = {
    "dp4": {"dp": 4},
    "dp4-zero1": {"dp": 4, "zero": 1},
    "dp4-zero2": {"dp": 4, "zero": 2},
    "dp4-zero3": {"dp": 4, "zero": 3},
    "tp2-dp2": {"dp": 2, "tp": 2},
    "pp2-dp2-1f1b": {"dp": 2, "pp": 2},
    "pp2-dp2-gpipe": {"dp": 2, "pp": 2, "schedule": "gpipe"},
    "tp2-pp2": {"dp": 1, "tp": 2, "pp": 2},
    "dp4-selective": {"dp": 4, "recompute": "selective"},
    "dp4-full": {"dp": 4, "recompute": "full"},
}
COMPONENTS = ("params", "grads", "optimizer", "activations")


def spec(model: str, layout: dict[str, object], cluster: dict | None, steps: int) -> dict:
    data = {"name": f"acc-{model}", "model": MODELS[model],
            "training": {"global_batch": 8, "steps": steps, "optimizer": "adam", "lr": 1e-3, "seed": 0},
            "cluster": cluster or {"preset": "cpu-local", "devices_per_node": 4},
            "parallel": {**BASE, **layout}}
    if model == "cnn":
        data["task"] = {"kind": "classification"}
    return data


def worst(summary: dict, name: str) -> float | None:
    errors = [r["components"][name]["rel_error"] for r in summary["memory"]["ranks"] if name in r["components"]]
    errors = [e for e in errors if e is not None]
    return max(errors, key=abs) if errors else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", help="cluster YAML from `trainplan calibrate` (default: the cpu-local preset)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    cluster = None
    if args.cluster:
        cluster = read_yaml(args.cluster)
        cluster.update(nodes=1, devices_per_node=4)
    cases, skipped = {}, []
    for model in args.models.split(","):
        for name in args.layouts.split(","):
            try:
                planned = plan(spec_from_dict(spec(model, LAYOUTS[name], cluster, args.steps)))[0]
                check_plan(planned)  # a plan the runtime refuses is reported, not run
                cases[f"{model}/{name}"] = planned
            except TrainplanError as exc:  # e.g. tp on a cnn: no such layout
                skipped.append((f"{model}/{name}", str(exc).splitlines()[0][:100]))
    root = Path(tempfile.mkdtemp(prefix="estimate-accuracy-"))
    outs = [root / k.replace("/", "-") for k in cases]
    start = time.perf_counter()
    code = launch_sweep(list(cases.values()), nproc=4, out_dirs=outs, run_dir=root / "run")
    if code != 0:
        sys.exit((root / "run" / "error.txt").read_text())
    rows = []
    for (key, p), out in zip(cases.items(), outs):
        s = json.loads((out / "summary.json").read_text())
        row = {"case": key, **{c: worst(s, c) for c in COMPONENTS},
               "step_time": s["measured_step_time_s"] / p.estimate.step_time_s - 1}
        rows.append(row)
    header = f"{'case':<22} " + " ".join(f"{c:>11}" for c in (*COMPONENTS, "step_time"))
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:<22} " + " ".join(f"{'—' if r[c] is None else f'{100 * r[c]:+.1f}%':>11}"
                                             for c in (*COMPONENTS, "step_time")))
    for key, why in skipped:
        print(f"{key:<22} skipped: {why}")
    exact = all(r[c] == 0 for r in rows for c in ("params", "grads", "optimizer") if r[c] is not None)
    print(json.dumps({"bench": "estimate_accuracy", "cases": len(rows), "skipped": len(skipped),
                      "model_states_exact": exact,
                      "activations_within_5pct": sum(1 for r in rows if r["activations"] is not None and abs(r["activations"]) <= 0.05),
                      "step_time_within_20pct": sum(1 for r in rows if abs(r["step_time"]) <= 0.2),
                      "elapsed_s": round(time.perf_counter() - start, 1), "rows": rows}))


if __name__ == "__main__":
    main()
