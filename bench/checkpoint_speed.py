"""Step time of the laptop GPT with a checkpoint after every step: none vs synchronous vs asynchronous saving.

The laptop GPT of ``bench/recovery.py`` (4 layers, hidden 128, vocabulary 512, sequence 64, global
batch 16, Adam; 11.2 MiB checkpoint with the optimizer state) on 2 gloo processes with dp=2,
``--steps`` steps, a checkpoint after every step (``keep=2``). Per run:

* ``train s/step``: the median step time in ``metrics.jsonl`` (forward, backward, update; with
  asynchronous saving it includes the slowdown from the writer thread sharing the cores);
* ``loop s/step``: the training loop's time per step including what the checkpointer held it up
  (the sum of the step times plus ``blocked_s`` of ``checkpoints.jsonl``: copying the state,
  writing it when synchronous, waiting for the previous write and committing), divided by the steps;
* ``held s/save``: the median time one save held the loop (``save_s``).

Every checkpointed run's final parameters are compared with the run without checkpoints (bit-equal
expected). Prints a table, then one JSON line.

    .venv/bin/python bench/checkpoint_speed.py [--steps 12] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import make_plan, params, records  # noqa: E402 - the same model and plan as the recovery bench

from trainplan.runtime.checkpoint import CheckpointOptions  # noqa: E402
from trainplan.runtime.launch import launch  # noqa: E402


def run(out: Path, steps: int, mode: str) -> dict[str, object]:
    plan = make_plan({"dp": 2, "tp": 1, "pp": 1, "zero": 0, "micro_batch": 8})
    checkpoint = None if mode == "none" else CheckpointOptions(out / "ckpt", every_steps=1, keep=2,
                                                                  asynchronous=mode == "async")
    code = launch(plan, nproc=2, out_dir=out, steps=steps, save_params=True, checkpoint=checkpoint)
    assert code == 0, (out / "error.txt").read_text()
    times = [float(r["step_time_s"]) for r in records(out / "metrics.jsonl")]
    saves = records(out / "checkpoints.jsonl")
    finish = next((r for r in saves if r.get("finish")), {"blocked_s": 0.0})
    held = [float(r["save_s"]) for r in saves if "step" in r]
    assert mode == "none" or len(held) == steps, saves
    return {"mode": mode, "train_s": statistics.median(times[1:]),
            "loop_s": (sum(times) + float(finish["blocked_s"])) / steps,
            "held_s": statistics.median(held) if held else 0.0, "blocked_s": float(finish["blocked_s"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="trainplan-ckpt-speed-"))
    rows = []
    for repeat in range(args.repeats):
        for mode in ("none", "sync", "async"):
            out = root / f"{mode}-{repeat}"
            rows.append({"repeat": repeat, **run(out, args.steps, mode)})
            if mode != "none":
                ours, base = params(out), params(root / f"none-{repeat}")
                rows[-1]["bit_equal"] = all(torch.equal(ours[k], base[k]) for k in base)
            shutil.rmtree(out / "ckpt", ignore_errors=True)
    print(f"\nlaptop GPT, dp=2 on gloo, {args.steps} steps, a checkpoint after every step ({args.repeats} repeats)")
    print(f"{'saving':<8}{'train s/step':>14}{'loop s/step':>13}{'held s/save':>13}{'params':>12}")
    for row in rows:
        equal = "-" if "bit_equal" not in row else ("bit-equal" if row["bit_equal"] else "DIFFER")
        print(f"{row['mode']:<8}{row['train_s']:>14.3f}{row['loop_s']:>13.3f}{row['held_s']:>13.3f}{equal:>12}")
    print(json.dumps({"bench": "checkpoint_speed", "steps": args.steps, "rows": rows}))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
