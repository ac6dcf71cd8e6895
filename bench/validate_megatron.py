"""Validate the cost model against Narayanan et al. 2021 (Megatron-LM, SC'21), Table 1.

For every GPT row: fix the row's tensor- and pipeline-parallel degrees, GPU count and global
batch on the ``a100-80g`` preset (no ZeRO, full recomputation and no sequence parallelism, as in the paper; micro-batch size
and schedule searched, since the paper does not publish them), and compare the predicted TFLOP/s
per GPU — the paper's Eq. 3 FLOPs over the predicted step time — with the measured value. Then let
the search choose the layout freely and check it is predicted at least as fast.

Prints a table and a final JSON line. ``python bench/validate_megatron.py``.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from pathlib import Path

from trainplan.ir.cluster import load_preset
from trainplan.ir.facts import TransformerFacts
from trainplan.ir.spec import ParallelSpec
from trainplan.planner.cost import megatron_iteration_flops
from trainplan.planner.evaluate import Context
from trainplan.planner.model_costs import model_costs_from_facts
from trainplan.planner.search import search

DATA = Path(__file__).resolve().parent / "data" / "megatron_sc21_table1.csv"
VOCAB, SEQ = 51200, 2048


def rows() -> list[dict[str, str]]:
    with DATA.open() as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def check_row(row: dict[str, str]) -> dict[str, object]:
    layers, hidden, heads = int(row["layers"]), int(row["hidden"]), int(row["heads"])
    tp, pp, gpus, batch = (int(row[k]) for k in ("tensor_parallel", "pipeline_parallel", "gpus", "global_batch"))
    facts = TransformerFacts("decoder", layers, hidden, heads, heads, 4 * hidden, VOCAB, SEQ, True)
    model = model_costs_from_facts(facts)
    ctx = Context(load_preset("a100-80g", nodes=gpus // 8), "bf16", "adam", batch, SEQ, "auto")
    flops = megatron_iteration_flops(facts, batch, "full")
    fixed = search(model, ParallelSpec(tp=tp, pp=pp, zero=0, recompute="full", sequence_parallel=False), ctx).ranked[0]
    free = search(model, ParallelSpec(), ctx).ranked[0]
    predicted = flops / fixed.step_time / gpus / 1e12
    measured = float(row["tflops_per_gpu"])
    return {
        "params_billion": float(row["params_billion"]),
        "gpus": gpus,
        "layout": fixed.layout.describe(),
        "measured_tflops": measured,
        "predicted_tflops": round(predicted, 1),
        "error": round(predicted / measured - 1, 4),
        "free_layout": free.layout.describe(),
        "free_step_s": round(free.step_time, 3),
        "fixed_step_s": round(fixed.step_time, 3),
    }


def main() -> int:
    start = time.perf_counter()
    results = [check_row(r) for r in rows()]
    print(f"{'params':>7} {'gpus':>5} {'measured':>9} {'predicted':>9} {'error':>7}  layout (published tp/pp, searched rest)")
    for r in results:
        print(f"{r['params_billion']:>6}B {r['gpus']:>5} {r['measured_tflops']:>9} {r['predicted_tflops']:>9} "
              f"{r['error'] * 100:>+6.1f}%  {r['layout']}")
    errors = [abs(r["error"]) for r in results]
    free_ok = all(r["free_step_s"] <= r["fixed_step_s"] * (1 + 1e-9) for r in results)
    summary = {
        "bench": "validate_megatron",
        "rows": len(results),
        "mean_abs_error": round(statistics.mean(errors), 4),
        "max_abs_error": round(max(errors), 4),
        "within_10pct": sum(e <= 0.10 for e in errors),
        "free_search_at_least_as_fast": free_ok,
        "elapsed_s": round(time.perf_counter() - start, 2),
        "results": results,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
