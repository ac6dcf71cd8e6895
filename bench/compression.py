"""Gradient compression on the laptop GPT: loss curve and bytes on the wire against no compression.

The laptop example (plans/laptop-gpt-tiny.yaml: GPT with 4 layers, hidden 128, vocabulary 512,
sequence 64, global batch 16, Adam lr 1e-3) planned for 4 local gloo processes with dp=4 (ZeRO-0,
DDP, our ring all-reduce so the bytes are counted; PowerSGD over the backend's own) and each
``parallel.compression`` fixed in turn: none, fp16, bf16, topk (ratio 0.01, error
feedback), powersgd (rank 2, error feedback). All plans run in one set of workers
(``launch_sweep``); ``metrics.jsonl`` gives each step's global mean loss and the bytes every rank
sent for the gradients (``wire_bytes``, summed over ranks). Prints the loss per step of each mode,
the final loss's difference from the uncompressed run, the median wire bytes per step and their
ratio to uncompressed, then one JSON line.

    .venv/bin/python bench/compression.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from trainplan import api
from trainplan.runtime.launch import launch_sweep

SPEC = Path(__file__).resolve().parents[1] / "plans" / "laptop-gpt-tiny.yaml"
MODES = ("none", "fp16", "bf16", "topk", "powersgd")
NPROC = 4


def plan_for(compression: str, steps: int):  # noqa: ANN201 - trainplan.ir.plan.Plan
    spec = api.load_spec(SPEC)
    data = spec.model_dump(mode="json", by_alias=True)
    data["cluster"] = {"preset": "cpu-local", "devices_per_node": NPROC}
    data["training"]["steps"] = steps
    # ring (ours) everywhere it applies, so every run counts its bytes; torch's PowerSGD hook rides on native
    allreduce = "native" if compression == "powersgd" else "ring"
    data["parallel"].update(dp=NPROC, tp=1, pp=1, zero=0, allreduce=allreduce, sync="sync", compression=compression)
    data["parallel"]["comm"] = {"topk_ratio": 0.01, "powersgd_rank": 2}
    return api.plan(api.spec_from_dict(data))[0]


def records(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trainplan-compression-") as tmp:
        outs = [Path(tmp) / mode for mode in MODES]
        code = launch_sweep([plan_for(mode, args.steps) for mode in MODES], nproc=NPROC, out_dirs=outs,
                            run_dir=Path(tmp) / "run")
        if code != 0:
            print((Path(tmp) / "run" / "error.txt").read_text(), file=sys.stderr)
            return code
        runs = {mode: records(out) for mode, out in zip(MODES, outs)}
    losses = {mode: [float(r["loss"]) for r in rs] for mode, rs in runs.items()}
    wire = {mode: statistics.median(int(r["wire_bytes"]) for r in rs if r.get("wire_bytes") is not None)
            for mode, rs in runs.items()}
    print(f"laptop GPT, dp={NPROC} on gloo, {args.steps} steps: global mean loss per step")
    print("step " + " ".join(f"{m:>9}" for m in MODES))
    for step in range(args.steps):
        print(f"{step:>4} " + " ".join(f"{losses[m][step]:9.4f}" for m in MODES))
    base_loss, base_wire = losses["none"][-1], wire["none"]
    print(f"\n{'mode':<9} {'final loss':>10} {'vs none':>9} {'wire bytes/step':>16} {'vs none':>8}")
    summary = {}
    for m in MODES:
        rel = (losses[m][-1] - base_loss) / base_loss
        summary[m] = {"final_loss": round(losses[m][-1], 5), "final_loss_rel_diff": round(rel, 5),
                      "wire_bytes_per_step": wire[m], "wire_ratio": round(wire[m] / base_wire, 4)}
        print(f"{m:<9} {losses[m][-1]:10.4f} {rel:+9.2%} {wire[m]:16,.0f} {wire[m] / base_wire:8.3f}")
    print(json.dumps({"bench": "compression", "nproc": NPROC, "steps": args.steps, "modes": summary,
                      "losses": {m: [round(x, 5) for x in v] for m, v in losses.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
