"""Our ZeRO model-state memory next to Rajbhandari et al. (SC'20) Table 1.

Reads ``bench/data/zero_sc20_table1.csv`` (per-device GB, 1 GB = 1e9 bytes, mixed-precision Adam,
K = 12), computes each cell with :func:`trainplan.planner.cost.model_state_bytes`, and prints a
table plus one JSON line. A cell "matches" when ours, rounded half-up to the digits the paper
prints, equals the printed value; "truncated" when the paper dropped the digits instead of
rounding (some 128B and 1T cells, e.g. 513.5 printed as 513). Exits 1 on any other difference.

    .venv/bin/python bench/validate_zero.py
"""

from __future__ import annotations

import csv
import json
import sys
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from pathlib import Path

from trainplan.planner.cost import model_state_bytes
from trainplan.planner.table import format_table

DATA = Path(__file__).resolve().parent / "data" / "zero_sc20_table1.csv"
COLUMNS = {1: "zero1_pos_gb", 2: "zero2_pos_g_gb", 3: "zero3_pos_g_p_gb"}
GB = 1e9


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def classify(ours: float, printed: str) -> str:
    """'match', 'truncated' or 'MISMATCH' at the printed precision."""
    exp = Decimal(printed)
    value = Decimal(repr(ours))
    if value.quantize(exp, rounding=ROUND_HALF_UP) == exp:
        return "match"
    if value.quantize(exp, rounding=ROUND_DOWN) == exp:
        return "truncated"
    return "MISMATCH"


def compare(rows: list[dict[str, str]]) -> list[dict[str, object]]:
    cells = []
    for row in rows:
        psi, nd = float(row["params_billion"]) * 1e9, int(row["dp_degree"])
        for stage, column in COLUMNS.items():
            ours = model_state_bytes(psi, stage, nd, "bf16", "adam").total / GB
            cells.append({"params_billion": row["params_billion"], "dp": nd, "stage": stage,
                          "published": row[column], "ours": ours, "verdict": classify(ours, row[column])})
    return cells


def main() -> int:
    cells = compare(read_rows(DATA))
    table = [[c["params_billion"], str(c["dp"]), f"ZeRO-{c['stage']}", str(c["published"]), f"{c['ours']:.6g}", str(c["verdict"])]
             for c in cells]
    print(format_table(["params (B)", "N_d", "stage", "published GB", "ours GB", "verdict"], table,
                       right=[True, True, False, True, True, False]))
    small = [c for c in cells if c["params_billion"] == "7.5"]
    summary = {
        "bench": "zero_sc20_table1",
        "cells": len(cells),
        "match": sum(c["verdict"] == "match" for c in cells),
        "truncated_in_paper": sum(c["verdict"] == "truncated" for c in cells),
        "mismatch": sum(c["verdict"] == "MISMATCH" for c in cells),
        "match_7_5b": f"{sum(c['verdict'] == 'match' for c in small)}/{len(small)}",
        "max_rel_diff": max(abs(float(c["ours"]) - float(str(c["published"]))) / float(str(c["published"])) for c in cells),
    }
    print(json.dumps(summary))
    return 1 if summary["mismatch"] else 0


if __name__ == "__main__":
    sys.exit(main())
