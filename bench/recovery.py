"""Faults injected into real runs and how the runtime recovers: recovery time, steps lost, exact results.

The laptop GPT (4 layers, hidden 128, vocabulary 512, sequence 64, global batch 16, Adam) on 2
gloo processes, planned by trainplan with dp=2 (or tp=2), 8 steps, a checkpoint every 2 steps:

* ``kill``: rank 1 SIGKILLs itself before step 5; the elastic agent restarts both workers
  (``max_restarts=1``), which resume from step 4;
* ``stop``: rank 1 SIGSTOPs itself before step 5 (a hung rank); rank 0's next collective times out
  after ``collective_timeout_s`` (5 s here), the agent stops the group and restarts it;
* ``corrupt``: the newest checkpoint of a finished run loses its last bytes; ``--resume`` warns,
  falls back to the previous one and trains the lost steps again;
* ``reshard``: a dp=2 checkpoint resumed under tp=2.

Recovery time = the fault (``faults.jsonl``) → the end of the first step after the resume
(``resumes.jsonl``). Every faulted run's final parameters are compared with an uninterrupted run's
(bit-equal expected; resharded: max difference shown). Prints a table, then one JSON line.

    .venv/bin/python bench/recovery.py [--repeats 3] [--skip-stop]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from trainplan import api
from trainplan.ir.plan import Plan
from trainplan.runtime.checkpoint import CheckpointOptions
from trainplan.runtime.launch import launch

MODEL = {"layers": 4, "hidden": 128, "heads": 4, "vocab": 512, "seq_len": 64}
STEPS, EVERY, FAULT_STEP = 8, 2, 5


def make_plan(parallel: dict[str, object], timeout_s: int = 60) -> Plan:
    spec = api.spec_from_dict({
        "name": "recovery", "model": {"catalogue": "gpt", "args": MODEL},
        "training": {"global_batch": 16, "steps": STEPS, "optimizer": "adam", "lr": 1e-3, "seed": 0},
        "cluster": {"preset": "cpu-local", "devices_per_node": 2}, "parallel": parallel,
    })
    plan, _ = api.plan(spec)
    return plan.model_copy(update={"collective_timeout_s": timeout_s})


def params(out: Path) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for path in sorted((out / "params").glob("stage-*.pt")):
        merged.update(torch.load(path, weights_only=True))
    return merged


def max_diff(a: Path, b: Path) -> float:
    pa, pb = params(a), params(b)
    return max(float((pa[k] - pb[k]).abs().max()) for k in pa)


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def faulted(plan: Plan, out: Path, fault: str) -> dict[str, object]:
    os.environ["TRAINPLAN_FAULT"] = fault
    try:
        code = launch(plan, nproc=2, out_dir=out, save_params=True, max_restarts=1,
                      checkpoint=CheckpointOptions(out / "ckpt", every_steps=EVERY))
    finally:
        del os.environ["TRAINPLAN_FAULT"]
    assert code == 0, (out / "error.txt").read_text()
    f, r = records(out / "faults.jsonl")[0], records(out / "resumes.jsonl")[0]
    return {"recovery_s": (int(r["time_ns"]) - int(f["time_ns"])) / 1e9,
            "steps_lost": int(f["step"]) - int(r["from_step"]), "load_s": r["load_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-stop", action="store_true", help="skip the SIGSTOP case (~40 s)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="trainplan-recovery-"))
    dp2 = make_plan({"dp": 2, "tp": 1, "pp": 1, "zero": 0, "micro_batch": 8})
    base = root / "base"
    code = launch(dp2, nproc=2, out_dir=base, save_params=True, checkpoint=CheckpointOptions(base / "ckpt", every_steps=EVERY))
    assert code == 0, (base / "error.txt").read_text()
    saves = [float(r["save_s"]) for r in records(base / "checkpoints.jsonl") if "save_s" in r]  # not the "finish" line
    size = sum(f.stat().st_size for f in next((base / "ckpt").iterdir()).iterdir())
    rows: list[dict[str, object]] = []
    for i in range(args.repeats):
        out = root / f"kill-{i}"
        rows.append({"fault": "kill", **faulted(dp2, out, f"kill:rank=1:step={FAULT_STEP}"), "max_param_diff": max_diff(out, base)})
    if not args.skip_stop:
        out = root / "stop"
        stop_plan = make_plan({"dp": 2, "tp": 1, "pp": 1, "zero": 0, "micro_batch": 8}, timeout_s=5)
        rows.append({"fault": "stop (timeout 5 s)", **faulted(stop_plan, out, f"stop:rank=1:step={FAULT_STEP}"),
                     "max_param_diff": max_diff(out, base)})
    corrupt = root / "corrupt"
    shutil.copytree(base / "ckpt", corrupt / "ckpt")
    newest = sorted((corrupt / "ckpt").iterdir())[-1]
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    code = launch(dp2, nproc=2, out_dir=corrupt, save_params=True, steps=STEPS,
                  checkpoint=CheckpointOptions(corrupt / "ckpt", resume=True))
    assert code == 0, (corrupt / "error.txt").read_text()
    r = records(corrupt / "resumes.jsonl")[0]
    rows.append({"fault": "corrupt newest", "recovery_s": None, "steps_lost": STEPS - int(r["from_step"]),
                 "load_s": r["load_s"], "max_param_diff": max_diff(corrupt, base)})
    tp2 = make_plan({"dp": 1, "tp": 2, "pp": 1, "zero": 0, "micro_batch": 16})
    reshard = root / "reshard"
    shutil.copytree(base / "ckpt" / "step-000004", reshard / "ckpt" / "step-000004")
    code = launch(tp2, nproc=2, out_dir=reshard, save_params=True, checkpoint=CheckpointOptions(reshard / "ckpt", resume=True))
    assert code == 0, (reshard / "error.txt").read_text()
    r = records(reshard / "resumes.jsonl")[0]
    rows.append({"fault": "reshard dp=2 -> tp=2", "recovery_s": None, "steps_lost": 0, "load_s": r["load_s"],
                 "max_param_diff": max_diff(reshard, base)})
    print(f"\ncheckpoint of the laptop GPT ({size / 2**20:.1f} MiB, dp=2): save median {statistics.median(saves):.3f} s "
          f"over {len(saves)} saves")
    print(f"{'fault':<22}{'recovery s':>12}{'steps lost':>12}{'load s':>9}{'max |param diff|':>18}")
    for row in rows:
        rec = "-" if row["recovery_s"] is None else f"{row['recovery_s']:.2f}"
        print(f"{row['fault']:<22}{rec:>12}{row['steps_lost']:>12}{row['load_s']:>9.2f}{row['max_param_diff']:>18.3g}")
    print(json.dumps({"bench": "recovery", "checkpoint_bytes": size, "save_s": saves, "rows": rows}))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
