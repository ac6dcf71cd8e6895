"""Model-coverage corpus: what `inspect`, `plan` and `run` (pp=2, tp=2) do on each model; writes docs/coverage.md.

    .venv/bin/python bench/coverage.py                       # the whole corpus, writes docs/coverage.md
    .venv/bin/python bench/coverage.py --models gpt,hf-llama --out /tmp/coverage.md --no-run

The corpus (``CORPUS``) is the catalogue models (gpt, llama, bert, mlp, cnn) and the Hugging Face
families built from config (gpt2, llama, mistral, qwen2, bert, t5, vit), each at a tiny size. For each:

* **inspect**: the graph front end's parameter count (``trainplan inspect``) next to the model's
  own count (``sum(p.numel())`` over its unique parameters: tied weights once); ✓ when equal.
* **plan**: ``trainplan plan`` on the ``a100-80g`` preset, 2 nodes × 8 GPUs; the chosen layout.
* **pp=2** / **tp=2**: the planner asked for that degree on ``cpu-local`` with 2 processes (every
  other field free), the plan checked by the runtime, then run for 2 steps (fp32, gloo) in one
  sweep of 2 workers and compared with the single-process run of the same spec: ✓ when every
  step's loss is within 1e-5 relative. ✗ gives the reason: the planner found no layout (e.g. a
  model kept whole, or no tensor-parallel rule), or the runtime refused the plan.

The table is generated; edit this script, not docs/coverage.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainplan import api  # noqa: E402
from trainplan.errors import TrainplanError  # noqa: E402
from trainplan.ir.plan import Plan  # noqa: E402
from trainplan.ir.spec import Spec  # noqa: E402
from trainplan.models import build_model  # noqa: E402

ROTARY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, vocab_size=64, max_position_embeddings=16)
LM_CATALOGUE = dict(layers=2, hidden=32, heads=4, vocab=64, seq_len=16)

# name -> (model section, task section)
CORPUS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "gpt": ({"catalogue": "gpt", "args": LM_CATALOGUE}, {}),
    "llama": ({"catalogue": "llama", "args": {**LM_CATALOGUE, "kv_heads": 2}}, {}),
    "bert": ({"catalogue": "bert", "args": LM_CATALOGUE}, {}),
    "mlp": ({"catalogue": "mlp", "args": {"input_dim": 12, "hidden": 24, "layers": 3, "classes": 10}},
            {"kind": "classification"}),
    "cnn": ({"catalogue": "cnn", "args": {}}, {"kind": "classification"}),
    "hf-gpt2": ({"hf": {"arch": "gpt2", "config": dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}}, {}),
    "hf-llama": ({"hf": {"arch": "llama", "config": ROTARY}}, {}),
    "hf-mistral": ({"hf": {"arch": "mistral", "config": {**ROTARY, "sliding_window": 16}}}, {}),
    "hf-qwen2": ({"hf": {"arch": "qwen2", "config": ROTARY}}, {}),
    "hf-bert": ({"hf": {"arch": "bert", "config": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                        intermediate_size=64, vocab_size=64, max_position_embeddings=16,
                                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)}},
                {}),
    "hf-t5": ({"hf": {"arch": "t5", "config": dict(num_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64,
                                                    vocab_size=64, dropout_rate=0.0)}}, {"seq_len": 16}),
    "hf-vit": ({"hf": {"arch": "vit", "config": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                      intermediate_size=64, image_size=8, patch_size=4, num_channels=3,
                                                      num_labels=10)}}, {"kind": "classification"}),
}

STEPS = 2
RTOL = 1e-5


def corpus_spec(name: str, cluster: dict[str, Any], parallel: dict[str, Any] | None = None,
                global_batch: int = 8) -> Spec:
    model, task = CORPUS[name]
    data: dict[str, Any] = {
        "name": f"coverage-{name}",
        "model": model,
        "training": {"global_batch": global_batch, "steps": STEPS, "optimizer": "adam", "lr": 1e-2, "seed": 3},
        "cluster": cluster,
        "parallel": parallel or {},
    }
    if task:
        data["task"] = task
    return api.spec_from_dict(data)


def own_count(spec: Spec) -> int:
    """The model's own parameter count: unique parameters (tied once), built on meta."""
    return sum(p.numel() for p in build_model(spec.model, spec.task, device="meta").module.parameters())


def kept_whole(spec: Spec) -> dict[str, str]:
    """Sub-modules the model declares indivisible, with why (Hugging Face T5)."""
    return dict(getattr(build_model(spec.model, spec.task, device="meta").module, "keep_whole", {}))


def layout(plan: Plan) -> str:
    extra = f" {plan.schedule}" if plan.mesh.pp > 1 else ""
    return f"dp={plan.mesh.dp} tp={plan.mesh.tp} pp={plan.mesh.pp}{extra} zero={plan.zero}"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    # A planner error ends with the model's own limits, which say more than the generic rules.
    text = text.split("or change the cluster; ")[-1]
    return text if len(text) <= 220 else text[:217] + "..."


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return fn(), None
    except TrainplanError as exc:
        return None, f"{type(exc).__name__}: {_short(exc)}"


def losses(out: Path) -> list[float]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()] if path.exists() else []


def run_layouts(names: list[str], degrees: dict[str, dict[str, int]], root: Path) -> dict[tuple[str, str], str]:
    """Plan, check and run every (model, layout) at 2 processes; cell text per (model, layout name)."""
    from trainplan.runtime.launch import launch_sweep, run_reference
    from trainplan.runtime.parallelize import check_plan

    cells: dict[tuple[str, str], str] = {}
    runnable: list[tuple[str, str, Plan]] = []
    for name in names:
        for label, fixed in degrees.items():
            spec = corpus_spec(name, {"preset": "cpu-local", "devices_per_node": 2}, fixed)
            result, error = _attempt(lambda spec=spec: api.plan(spec)[0])
            if error:
                cells[(name, label)] = f"✗ planner: {error}"
                continue
            _, error = _attempt(lambda result=result: check_plan(result))
            if error:
                cells[(name, label)] = f"✗ runtime refuses {layout(result)}: {error}"
                continue
            runnable.append((name, label, result))
    references: dict[str, Path] = {}
    for name, _, plan in runnable:
        if name not in references:
            references[name] = root / f"reference-{name}"
            run_reference(plan.spec, references[name])
    outs = [root / f"{name}-{label}" for name, label, _ in runnable]
    if runnable:
        code = launch_sweep([p for _, _, p in runnable], nproc=2, out_dirs=outs, run_dir=root / "sweep")
        failure = (root / "sweep" / "error.txt").read_text().strip().splitlines()[:1] if code else []
    for (name, label, plan), out in zip(runnable, outs):
        ours, ref = losses(out), losses(references[name])
        if len(ours) != STEPS or len(ref) != STEPS:
            reason = failure[0] if failure else "no metrics written"
            cells[(name, label)] = f"✗ run failed ({layout(plan)}): {_short(Exception(reason))}"
            continue
        rel = max(abs(a - b) / abs(b) for a, b in zip(ours, ref))
        mark = "✓" if rel <= RTOL else "✗ losses differ:"
        cells[(name, label)] = f"{mark} {layout(plan)}, max rel. loss diff {rel:.1e}"
    return cells


def table(names: list[str], run: bool) -> str:
    rows = []
    cells: dict[tuple[str, str], str] = {}
    degrees = {"pp=2": {"pp": 2}, "tp=2": {"tp": 2}}
    if run:
        with tempfile.TemporaryDirectory(prefix="coverage-") as tmp:
            cells = run_layouts(names, degrees, Path(tmp))
    notes: list[str] = []
    for name in names:
        spec = corpus_spec(name, {"preset": "a100-80g", "nodes": 2}, global_batch=64)
        count = own_count(spec)
        graph, error = _attempt(lambda spec=spec: api.trace(spec))
        if error:
            inspect_cell = f"✗ {error}"
        else:
            inspect_cell = f"{'✓' if graph.params == count else '✗'} {graph.params:,} (model: {count:,})"
        planned, error = _attempt(lambda spec=spec: api.plan(spec)[0])
        plan_cell = f"✗ {error}" if error else f"✓ {layout(planned)}"
        run_cells = [cells.get((name, label), "not run") for label in degrees]
        rows.append(f"| {name} | {_source(spec)} | {inspect_cell} | {plan_cell} | " + " | ".join(run_cells) + " |")
        for path, why in kept_whole(spec).items():
            notes.append(f"* **{name}**: `{path}` is kept whole (one unit, never cut or sharded): {why}.")
    head = ("| model | built from | inspect: parameters | plan (a100-80g, 2 nodes × 8) | run pp=2 (2 procs) "
            "| run tp=2 (2 procs) |\n|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows) + ("\n\n" + "\n".join(notes) if notes else "")


def _source(spec: Spec) -> str:
    if spec.model.hf is not None:
        return f"transformers `{spec.model.hf.arch}` config"
    return f"catalogue `{spec.model.catalogue}`"


HEADER = """# Model coverage

Generated by `bench/coverage.py` — do not edit by hand; regenerate with

    .venv/bin/python bench/coverage.py

Each model of the corpus is tiny (2 layers, hidden 32, vocabulary 64, sequence 16 where these
apply; Hugging Face models are built from a config, nothing is downloaded). *inspect* compares the
graph front end's parameter count with the model's own count (tied weights once). *plan* is the
planner's layout for 16 A100-80GB GPUs (global batch 64). *run pp=2 / tp=2* asks the planner for that degree on 2
local CPU processes, runs the plan for {steps} steps (fp32, gloo) and compares each step's loss with
the single-process run of the same spec (✓: within {rtol:g} relative). A ✗ gives the planner's or
the runtime's reason.

"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CORPUS), help="comma-separated corpus names")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "coverage.md"))
    parser.add_argument("--no-run", action="store_true", help="inspect and plan only (no processes)")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(CORPUS))
    if unknown:
        parser.error(f"unknown corpus models {unknown}; known: {', '.join(CORPUS)}")
    text = HEADER.format(steps=STEPS, rtol=RTOL) + table(names, run=not args.no_run) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
