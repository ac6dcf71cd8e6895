"""Compare a parallel run's outputs with the single-process reference run of the same spec."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.runtime.plans import make_plan
from trainplan.ir.spec import Spec
from trainplan.models import synthetic_batch
from trainplan.models import loss_fn as task_loss_fn
from trainplan.runtime.launch import launch_sweep, run_reference
from trainplan.runtime.materialize import build_meta_model, materialize_local, model_aliases


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_params(out: Path) -> dict[str, torch.Tensor]:
    """Every stage's saved parameters, merged (names as in the whole model)."""
    merged: dict[str, torch.Tensor] = {}
    for path in sorted((out / "params").glob("stage-*.pt")):
        merged.update(torch.load(path, weights_only=True))
    return merged


def max_relative_loss_difference(out: Path, reference: Path) -> float:
    ours, ref = losses(out), losses(reference)
    assert len(ours) == len(ref), (ours, ref)
    return max(abs(a - b) / abs(b) for a, b in zip(ours, ref))


def zero_gradient_params(spec: Spec) -> set[str]:
    """Parameters whose true gradient is zero (e.g. attention key biases: softmax ignores a constant shift).

    Their parallel gradient is rounding noise, which Adam turns into O(lr) steps (TORCH-NOTES).
    """
    built = build_meta_model(spec)
    model = built.module
    materialize_local([model], device=torch.device("cpu"), seed=spec.training.seed, aliases=model_aliases(model))
    inputs, targets = synthetic_batch(built.task, spec.training.global_batch, spec.training.seed, 0)
    task_loss_fn(built.task)(model(inputs), targets).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().max()) < 1e-7}


@dataclass
class Comparison:
    max_rel_loss: float
    max_param_diff: float
    checked: int


def compare(out: Path, reference: Path, spec: Spec, *, rtol: float = 1e-5, param_atol: float = 1e-5) -> Comparison:
    """Assert losses within ``rtol`` (relative) and final parameters within ``param_atol`` of the reference.

    Tied names (``lm_head.weight`` on another stage) are compared with the reference's canonical
    parameter; Adam's zero-gradient parameters only within the bound of their Adam steps.
    """
    rel = max_relative_loss_difference(out, reference)
    assert rel <= rtol, f"losses differ by {rel:.3g} relative: {losses(out)} vs {losses(reference)}"
    ours, ref = final_params(out), final_params(reference)
    aliases = model_aliases(build_meta_model(spec).module)
    assert {aliases.get(n, n) for n in ours} == set(ref), sorted(set(ours) ^ set(ref))
    noisy = zero_gradient_params(spec) if spec.training.optimizer != "sgd" else set()
    bound = 4 * spec.training.lr * spec.training.steps  # |Adam step| <= lr (1-b1)/sqrt(1-b2) < 4 lr
    worst = 0.0
    for name, value in ours.items():
        canonical = aliases.get(name, name)
        diff = float((value - ref[canonical]).abs().max())
        limit = bound if canonical in noisy else param_atol
        assert diff <= limit, f"{name}: final values differ by {diff:.3g} (allowed {limit:.3g})"
        if canonical not in noisy:
            worst = max(worst, diff)
    return Comparison(rel, worst, len(ours))


def run_cases(cases: dict[str, tuple[Spec, dict[str, object]]], root: Path, *, nproc: int = 4,
              save_params: bool = True) -> dict[str, tuple[Spec, Path, Path]]:
    """Run every case's reference in this process and all its plans in one sweep of ``nproc`` workers.

    ``cases``: name -> (spec, layout keywords of ``make_plan``). Returns name -> (spec, parallel
    output, reference output). A failed sweep fails with the launcher's error text.
    """
    references: dict[str, Path] = {}
    out: dict[str, tuple[Spec, Path, Path]] = {}
    for name, (spec, _) in cases.items():
        key = spec.model_dump_json()
        if key not in references:
            references[key] = root / f"reference-{len(references)}"
            run_reference(spec, references[key], save_params=save_params)
        out[name] = (spec, root / name, references[key])
    plans = [make_plan(spec, **layout) for spec, layout in cases.values()]
    code = launch_sweep(plans, nproc=nproc, out_dirs=[out[n][1] for n in cases], run_dir=root / "run",
                        save_params=save_params)
    assert code == 0, (root / "run" / "error.txt").read_text()
    return out
