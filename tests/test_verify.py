"""``trainplan verify``: the scaled-down layout against one process, and a deliberately wrong run failing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.runtime.plans import gpt_spec
from trainplan.api import plan, spec_from_dict
from trainplan.cli import main
from trainplan.ir.plan import Plan
from trainplan.runtime.measure import PERTURB_ENV
from trainplan.verify import VerifyError, shrunk_spec


def big_plan(**parallel: object) -> Plan:
    """A plan of an 8-process GPT (8 layers, hidden 64): bigger than what verify runs."""
    data = gpt_spec(8, layers=8, hidden=64, heads=8, vocab=128, seq_len=32, global_batch=32)
    data["parallel"] = parallel
    return plan(spec_from_dict(data))[0]


def test_shrunk_spec_keeps_the_layout_kinds_and_caps_degrees() -> None:
    p = big_plan(dp=2, tp=2, pp=2, zero=0, schedule="gpipe", recompute="full")
    data, nproc = shrunk_spec(p)
    assert nproc == 8
    par = data["parallel"]
    assert (par["dp"], par["tp"], par["pp"], par["schedule"], par["recompute"], par["zero"]) == (2, 2, 2, "gpipe", "full", 0)
    args = data["model"]["args"]
    assert args["layers"] == 4 and args["hidden"] == 32 and args["tie_embeddings"] is True


def test_verify_refuses_a_non_catalogue_model() -> None:
    p = big_plan(dp=8, tp=1, pp=1)
    p = p.model_copy(update={"spec": p.spec.model_copy(update={"model": p.spec.model.model_copy(
        update={"catalogue": None, "import_": "pkg.mod:fn"})})})
    with pytest.raises(VerifyError, match="catalogue models only"):
        shrunk_spec(p)


@pytest.mark.slow
def test_verify_passes_a_good_plan_and_fails_a_perturbed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(big_plan(dp=4, tp=1, pp=2, zero=1, schedule="1f1b").model_dump(mode="json", by_alias=True)))
    assert main(["verify", str(path), "--steps", "2", "-o", str(tmp_path / "good")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "dp=2" in out and "pp=2" in out and "zero=1" in out
    # The wrong run on 2 processes (half the start-up of 4; the comparison does not depend on the
    # layout): dp=2 with ZeRO-1, so rank 1's wrong update of its optimizer partition reaches the
    # parameters rank 0 saves as well as the losses.
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(big_plan(dp=8, tp=1, pp=1, zero=1).model_dump(mode="json", by_alias=True)))
    monkeypatch.setenv(PERTURB_ENV, "1")  # test aid: rank 1 adds 1e-2 to its gradients before each step
    assert main(["verify", str(small), "--steps", "2", "-o", str(tmp_path / "bad")]) == 1
    out = capsys.readouterr().out
    assert "dp=2" in out and "zero=1" in out and "on 2 processes" in out
    assert "FAIL" in out and "differ" in out and "step 1: loss" in out  # parameters and the second step's loss


def test_only_elements_with_a_near_zero_gradient_get_adams_noise_bound(tmp_path: Path) -> None:
    """Adam turns the rounding of a gradient at noise level into steps of up to lr: those elements
    (every attention key bias here) are held to 4·lr·steps; every other element to 1e-5, however few
    of a tensor's elements are noisy."""
    import torch

    from trainplan.verify import EXACT_LOSS_RTOL, EXACT_PARAM_ATOL, Verdict, _compare_params, _noisy_elements

    small = big_plan(dp=8, tp=1, pp=1, zero=0)
    noisy = _noisy_elements(small)
    bias = next(n for n in noisy if n.endswith("attn.k.bias"))
    assert bool(noisy[bias].all())  # softmax ignores a constant shift: no gradient at all
    weight = next(n for n in small_params(small) if n.endswith("attn.v.weight"))
    bound = 4 * small.spec.training.lr * small.spec.training.steps

    def verdict_with(changes: dict[str, float]) -> Verdict:
        ref = small_params(small)
        ours = {n: t.clone() for n, t in ref.items()}
        for name, delta in changes.items():
            held = ~noisy.get(name, torch.zeros_like(ours[name], dtype=torch.bool))
            ours[name].view(-1)[int(held.view(-1).nonzero()[0]) if name == weight else 0] += delta
        for side, params in (("parallel", ours), ("reference", ref)):
            (tmp_path / side / "params").mkdir(parents=True, exist_ok=True)
            torch.save(params, tmp_path / side / "params" / "stage-0.pt")
        verdict = Verdict(True, "test", EXACT_LOSS_RTOL, EXACT_PARAM_ATOL)
        _compare_params(verdict, small, tmp_path / "parallel", tmp_path / "reference")
        return verdict

    assert verdict_with({bias: 0.5 * bound}).passed
    bad = verdict_with({weight: 2e-5})
    assert not bad.passed and bad.worst_param == weight and "allowed 1e-05" in bad.failures[0]
    loose = verdict_with({bias: 2 * bound})
    assert not loose.passed and "near-zero gradient" in loose.failures[0]


def small_params(p: Plan) -> dict:
    """The serial model's initial parameters, by name (what a run's ``params/stage-*.pt`` holds)."""
    import torch

    from trainplan.runtime.materialize import build_meta_model, materialize_local, model_aliases

    model = build_meta_model(p.spec).module
    materialize_local([model], device=torch.device("cpu"), seed=p.spec.training.seed, aliases=model_aliases(model))
    return {n: t.detach().clone() for n, t in model.named_parameters()}
