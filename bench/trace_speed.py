"""How fast the front end traces and costs GPT-3 175B and a 1T GPT on meta tensors.

Each model runs in a fresh Python process (so peak RSS is its own): build on meta, capture,
annotate, linearise, name block types. Prints a table, then one JSON line with every row and
whether each stayed within the budget (10 s of wall time, 2 GiB peak RSS on a 2-core machine).

    .venv/bin/python bench/trace_speed.py [--models gpt3-175b gpt-1t] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

# Brown et al. 2020, Table 2.1 (GPT-3 175B); a 1T GPT as in Narayanan et al. 2021, Table 1.
MODELS = {
    "gpt3-175b": dict(layers=96, hidden=12288, heads=96, vocab=50257, seq_len=2048),
    "gpt-1t": dict(layers=128, hidden=25600, heads=160, vocab=51200, seq_len=2048),
}
BUDGET_S = 10.0
BUDGET_RSS_GIB = 2.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one(name: str, dtype_name: str) -> dict[str, object]:
    """Run in the child process: time each step and read the process's peak RSS."""
    start = time.perf_counter()
    import torch

    from trainplan.ir.spec import ModelSpec
    from trainplan.models import build_model
    from trainplan.passes import annotate, capture, detect_blocks, linearise

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    steps: dict[str, float] = {}
    t = time.perf_counter()
    steps["import_s"] = t - start
    cpu_start = _cpu_seconds()
    built = build_model(ModelSpec(catalogue="gpt", args=MODELS[name]), device="meta")
    steps["build_s"], t = time.perf_counter() - t, time.perf_counter()
    captured = capture(built)
    steps["capture_s"], t = time.perf_counter() - t, time.perf_counter()
    graph = annotate(captured, dtype)
    steps["annotate_s"], t = time.perf_counter() - t, time.perf_counter()
    graph = detect_blocks(linearise(graph))
    steps["linearise_blocks_s"] = time.perf_counter() - t
    total = sum(v for k, v in steps.items() if k != "import_s")
    cpu = _cpu_seconds() - cpu_start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "model": name,
        **{k: round(v, 3) for k, v in steps.items()},
        "total_s": round(total, 3),
        "cpu_s": round(cpu, 3),  # user + system time of the same steps: what load on the machine does not inflate
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "params": graph.params,
        "tflop_per_sample": round((graph.flops_fwd + graph.flops_bwd) / 1e12, 1),
        "nodes": len(graph.nodes),
        "units": len(graph.units),
        "block_groups": [g.label for g in graph.block_groups()],
        "frontend": graph.frontend,
    }


def run(name: str, dtype: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--dtype", dtype], check=True,
                         capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["within_budget"] = row["total_s"] < BUDGET_S and row["peak_rss_mib"] < BUDGET_RSS_GIB * 1024
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--child", choices=list(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.dtype)))
        return
    rows = [run(name, args.dtype) for name in args.models]
    print(f"{'model':10} {'build s':>8} {'capture s':>10} {'annotate s':>11} {'units s':>8} {'total s':>8} "
          f"{'cpu s':>6} {'peak MiB':>9} {'params':>15} {'TFLOP/sample':>13} {'nodes':>6}  blocks")
    for r in rows:
        print(f"{r['model']:10} {r['build_s']:8.2f} {r['capture_s']:10.2f} {r['annotate_s']:11.2f} "
              f"{r['linearise_blocks_s']:8.2f} {r['total_s']:8.2f} {r['cpu_s']:6.2f} {r['peak_rss_mib']:9.1f} "
              f"{r['params']:15,d} {r['tflop_per_sample']:13.1f} {r['nodes']:6d}  "
              f"{', '.join(r['block_groups'])}")  # type: ignore[arg-type]
    print(json.dumps({"bench": "trace_speed", "dtype": args.dtype, "budget_s": BUDGET_S,
                      "budget_rss_gib": BUDGET_RSS_GIB, "rows": rows,
                      "within_budget": all(r["within_budget"] for r in rows)}))


if __name__ == "__main__":
    main()
