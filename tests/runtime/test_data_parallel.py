"""Data parallelism, ZeRO 0-3: dp=4 equals the single-process run (losses and final parameters)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.equivalence import compare, run_cases
from tests.runtime.plans import gpt_spec, mlp_spec
from trainplan.ir.loading import validate
from trainplan.ir.spec import Spec

pytestmark = pytest.mark.slow

SPECS = {
    # Adam, as users train; the comparison allows for Adam's zero-gradient parameters.
    "gpt": validate(Spec, gpt_spec(4, lr=1e-3)),
    # SGD: parameters compare at rounding level, and a wrongly scaled gradient (Adam hides it) shows.
    "mlp": validate(Spec, mlp_spec(4, optimizer="sgd", lr=0.1)),
}
# Two micro-batches per replica, so gradient accumulation (no_sync / FSDP sync off) is exercised.
CASES = {f"{model}-zero{zero}": (spec, dict(dp=4, zero=zero, micro_batch=spec.training.global_batch // 8))
         for model, spec in SPECS.items() for zero in (0, 1, 2, 3)}
# A Hugging Face GPT-2 (built from a config, no dropout) through the adapter, sharded by FSDP2.
HF_GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 64, "n_positions": 16, "bos_token_id": 0,
           "eos_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
CASES["hf-gpt2-zero3"] = (validate(Spec, {**gpt_spec(4, lr=1e-3), "model": {"hf": {"arch": "gpt2", "config": HF_GPT2}}}),
                          dict(dp=4, zero=3, micro_batch=1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Spec, Path, Path]]:
    return run_cases(CASES, tmp_path_factory.mktemp("dp"))


@pytest.mark.parametrize("case", list(CASES))
def test_dp4_equals_single_process(case: str, runs: dict[str, tuple[Spec, Path, Path]]) -> None:
    spec, out, reference = runs[case]
    result = compare(out, reference, spec)
    print(f"{case} dp=4: max rel loss diff {result.max_rel_loss:.2e}, max param diff {result.max_param_diff:.2e}")
