"""``trainplan verify PLAN``: run the plan's layout scaled down to this machine against one process.

The parity gate before a long run. The plan's kinds of parallelism are kept — data, tensor and
pipeline parallelism with each degree capped at 2, the schedule (interleaved with at most 2 model
chunks per rank), ZeRO stage, recomputation, sequence parallelism, all-reduce algorithm, sync mode,
compression and precision — and the catalogue model is shrunk in depth and width but not in
structure (same blocks, attention kind, tying, gating): hidden 32, 4 heads, vocabulary 64,
sequence 16, two blocks per stage, dropout 0 (dropout masks differ by rank, so a run with dropout
cannot reproduce the serial one). The shrunk spec is planned with every parallel field fixed,
run on ``dp·tp·pp`` local gloo processes, and compared with the plain single-process run of the
same spec (:func:`trainplan.runtime.launch.run_reference`): the loss of every step and the final
parameters.

Tolerances: synchronous fp32 without compression — the runtime's contract — 1e-5 relative on
each step's loss and 1e-5 (absolute, the parameters are O(1)) on each final parameter. Elements
whose gradient is at rounding-noise level (below :data:`NOISY_GRAD` in the serial run's first
step: attention key biases, whose true gradient is zero since softmax ignores a constant shift, or
a weight element whose gradient terms cancel) are different: Adam's step ``lr·g/(|g|+ε)`` turns
the rounding of a different summation order into steps of up to ``lr`` each, so with Adam they
are held to that bound (``4·lr·steps``) instead. Seen on an AMD EPYC: one element of a
1024-element value projection with a first-step gradient of 4e-8 (the tensor's median: 2e-3) ended
2.2e-5 from the serial run, its other elements within 4e-7. bf16/fp16, gradient compression and
non-synchronous modes change the numbers by design: 2e-2 relative on losses and 5e-2 on parameters
(bf16 and fp16 runs of the runtime's tests train within 2% of fp32).

Only catalogue models can be shrunk; a plan of an imported or Hugging Face model is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainplan.errors import TrainplanError
from trainplan.ir.plan import Plan

EXACT_LOSS_RTOL = 1e-5
EXACT_PARAM_ATOL = 1e-5
LOOSE_LOSS_RTOL = 2e-2
LOOSE_PARAM_ATOL = 5e-2
# A first-step gradient below this is rounding noise to Adam (100x its default ε = 1e-8): the step
# lr·g/(|g|+ε) then moves by lr·ε/(|g|+ε)² per unit of g, 1e2 or more at lr = 1e-2 (module docstring).
NOISY_GRAD = 1e-6
SMALL = {"hidden": 32, "heads": 4, "vocab": 64, "seq_len": 16}


class VerifyError(TrainplanError):
    """A plan that cannot be verified (e.g. not a catalogue model)."""


@dataclass
class Verdict:
    passed: bool
    layout: str
    loss_rtol: float
    param_atol: float
    steps: list[dict[str, float]] = field(default_factory=list)  # step, parallel, reference, rel_diff
    max_param_diff: float = 0.0
    worst_param: str = ""
    failures: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"verify: {self.layout}", f"tolerance: losses {self.loss_rtol:g} relative, parameters {self.param_atol:g}",
                 "step  parallel loss  single-process loss  relative difference"]
        lines += [f"{s['step']:>4}  {s['parallel']:>13.7f}  {s['reference']:>19.7f}  {s['rel_diff']:>19.3e}" for s in self.steps]
        lines.append(f"final parameters: largest difference {self.max_param_diff:.3e} ({self.worst_param})")
        lines += [f"FAIL: {f}" for f in self.failures]
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def shrunk_args(catalogue: str, args: dict[str, Any], blocks: int) -> dict[str, Any]:
    """The catalogue model's args made small: ``blocks`` blocks, hidden 32, 4 heads, vocabulary 64, sequence 16."""
    out = dict(args)
    if catalogue in ("gpt", "llama", "bert"):
        out.update(SMALL, layers=blocks)
        out.pop("ffn_hidden", None)
        if "dropout" in out:
            out["dropout"] = 0.0
        if catalogue == "llama":
            kv = args.get("kv_heads")
            out["kv_heads"] = None if kv is None or kv == args.get("heads") else 2  # keep grouped-query attention
            out["multiple_of"] = 8
            out.pop("ffn_multiplier", None)
    elif catalogue == "mlp":
        out.update(hidden=24, layers=max(blocks, 2))
    elif catalogue == "cnn":
        out.update(blocks=max(1, blocks // 2))
    else:
        raise VerifyError(f"model.catalogue {catalogue!r}: verify shrinks the catalogue models gpt, llama, bert, mlp and cnn")
    return out


def shrunk_spec(plan: Plan) -> tuple[dict[str, Any], int]:
    """The plan's spec scaled down to this machine, every parallel field fixed; (spec, processes)."""
    spec = plan.spec
    if spec.model.catalogue is None:
        raise VerifyError("verify shrinks catalogue models only; this plan's model is imported or a Hugging Face "
                          "config (run it with `trainplan run --steps 3` and compare with `--nproc 1` instead)")
    dp, tp, pp = (min(d, 2) for d in (plan.mesh.dp, plan.mesh.tp, plan.mesh.pp))
    v = min(plan.virtual_stages, 2) if plan.schedule == "interleaved" else 1
    m = 2 * pp if pp > 1 else min(plan.num_microbatches, 2)
    data = spec.model_dump(mode="json", by_alias=True)
    data["model"]["args"] = shrunk_args(spec.model.catalogue, dict(spec.model.args), 2 * pp * v)
    data["task"] = {"kind": spec.task.kind}
    data["training"].update(global_batch=dp * m, tokens=None)
    data["cluster"] = {"preset": "cpu-local", "devices_per_node": dp * tp * pp}
    data["parallel"] = {
        "dp": dp, "tp": tp, "pp": pp, "micro_batch": 1, "schedule": plan.schedule, "virtual_stages": v,
        "zero": plan.zero, "recompute": plan.recompute, "sequence_parallel": plan.sequence_parallel and tp > 1,
        "allreduce": plan.allreduce if dp > 1 else "native", "sync": plan.sync, "compression": plan.compression,
    }
    return data, dp * tp * pp


def tolerances(plan: Plan) -> tuple[float, float]:
    exact = plan.spec.training.precision == "fp32" and plan.sync == "sync" and plan.compression == "none"
    return (EXACT_LOSS_RTOL, EXACT_PARAM_ATOL) if exact else (LOOSE_LOSS_RTOL, LOOSE_PARAM_ATOL)


def verify(plan: Plan, out_dir: Path, steps: int = 3) -> Verdict:
    """Plan, run and compare the scaled-down layout (see the module docstring)."""
    from trainplan import api
    from trainplan.runtime.launch import launch, run_reference

    data, nproc = shrunk_spec(plan)
    data["training"]["steps"] = steps
    spec = api.resolve(api.spec_from_dict(data))
    small, _ = api.plan(spec)
    loss_rtol, param_atol = tolerances(small)
    run_reference(small.spec, out_dir / "reference", steps, save_params=True)
    code = launch(small, nproc=nproc, out_dir=out_dir / "parallel", steps=steps, save_params=True)
    from trainplan.planner.report import layout_line

    verdict = Verdict(True, f"{layout_line(small)} on {nproc} processes", loss_rtol, param_atol)
    if code != 0:
        verdict.passed = False
        verdict.failures.append(f"the parallel run failed: {(out_dir / 'parallel' / 'error.txt').read_text().strip()}")
        return verdict
    _compare_losses(verdict, out_dir / "parallel", out_dir / "reference")
    _compare_params(verdict, small, out_dir / "parallel", out_dir / "reference")
    (out_dir / "verify.json").write_text(json.dumps(verdict.__dict__, indent=2) + "\n")
    return verdict


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _compare_losses(verdict: Verdict, parallel: Path, reference: Path) -> None:
    for step, (a, b) in enumerate(zip(_losses(parallel), _losses(reference))):
        rel = abs(a - b) / abs(b) if b else abs(a)
        verdict.steps.append({"step": step, "parallel": a, "reference": b, "rel_diff": rel})
        if not rel <= verdict.loss_rtol or not math.isfinite(a):
            verdict.passed = False
            verdict.failures.append(f"step {step}: loss {a:.7f} vs {b:.7f} ({rel:.3e} relative > {verdict.loss_rtol:g})")


def _params(out: Path) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for path in sorted((out / "params").glob("stage-*.pt")):
        merged.update(torch.load(path, weights_only=True))
    return merged


def _compare_params(verdict: Verdict, plan: Plan, parallel: Path, reference: Path) -> None:
    from trainplan.runtime.materialize import build_meta_model, model_aliases

    ours, ref = _params(parallel), _params(reference)
    aliases = model_aliases(build_meta_model(plan.spec).module)
    noisy = _noisy_elements(plan) if plan.spec.training.optimizer != "sgd" else {}
    adam_bound = max(4 * plan.spec.training.lr * plan.spec.training.steps, verdict.param_atol)  # |Adam step| < 4 lr
    for name, value in sorted(ours.items()):
        canonical = aliases.get(name, name)
        if canonical not in ref:
            verdict.passed = False
            verdict.failures.append(f"{name}: not in the single-process model")
            continue
        diff = (value.float() - ref[canonical].float()).abs()
        mask = noisy.get(canonical, torch.zeros_like(diff, dtype=torch.bool))
        held, loose = diff[~mask], diff[mask]
        worst = float(held.max()) if held.numel() else 0.0
        if worst > verdict.max_param_diff:
            verdict.max_param_diff, verdict.worst_param = worst, name
        if not worst <= verdict.param_atol:
            verdict.passed = False
            verdict.failures.append(f"{name}: final values differ by {worst:.3e} (allowed {verdict.param_atol:g})")
        if loose.numel() and not float(loose.max()) <= adam_bound:
            verdict.passed = False
            verdict.failures.append(f"{name}: final values of elements with a near-zero gradient differ by "
                                    f"{float(loose.max()):.3e} (allowed {adam_bound:g})")


def _noisy_elements(plan: Plan) -> dict[str, torch.Tensor]:
    """Per parameter with any, the mask of the elements whose first-step gradient in the serial run is
    below :data:`NOISY_GRAD` (rounding noise under Adam, module docstring)."""
    from trainplan.models import loss_fn, synthetic_batch
    from trainplan.runtime.materialize import build_meta_model, materialize_local, model_aliases

    spec = plan.spec
    built = build_meta_model(spec)
    model = built.module
    materialize_local([model], device=torch.device("cpu"), seed=spec.training.seed, aliases=model_aliases(model))
    inputs, targets = synthetic_batch(built.task, spec.training.global_batch, spec.training.seed, 0)
    loss_fn(built.task)(model(inputs), targets).backward()
    masks = {n: p.grad.abs() < NOISY_GRAD for n, p in model.named_parameters() if p.grad is not None}
    return {n: mask for n, mask in masks.items() if bool(mask.any())}
