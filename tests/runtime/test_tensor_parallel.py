"""Tensor parallelism (DTensor), with data and pipeline parallelism, equals the single-process run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.equivalence import compare, run_cases
from tests.runtime.plans import GPT_TP_STYLES, gpt_spec
from trainplan.ir.loading import validate
from trainplan.ir.spec import Spec

pytestmark = pytest.mark.slow

ADAM = validate(Spec, gpt_spec(4, lr=1e-3))
CASES = {
    # replicate (FSDP2-based DDP) over dp, vocab-parallel embedding and loss
    "tp2-dp2-zero0": (ADAM, dict(tp=2, dp=2, zero=0, micro_batch=2, tp_styles=GPT_TP_STYLES)),
    # FSDP2 x TP (2-D DTensor shards), SGD so a gradient scale error shows
    "tp2-dp2-zero3-sgd": (validate(Spec, gpt_spec(4, optimizer="sgd", lr=0.5)),
                          dict(tp=2, dp=2, zero=3, micro_batch=2, tp_styles=GPT_TP_STYLES)),
    # TP inside pipeline stages, tied embedding across stages
    "tp2-pp2": (ADAM, dict(tp=2, pp=2, micro_batch=2, schedule="1f1b", tp_styles=GPT_TP_STYLES)),
    # ... with the residual stream split along the sequence
    "tp2-pp2-sp": (ADAM, dict(tp=2, pp=2, micro_batch=2, schedule="1f1b", sequence_parallel=True,
                              tp_styles=GPT_TP_STYLES)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Spec, Path, Path]]:
    return run_cases(CASES, tmp_path_factory.mktemp("tp"))


@pytest.mark.parametrize("case", list(CASES))
def test_tensor_parallel_equals_single_process(case: str, runs: dict[str, tuple[Spec, Path, Path]]) -> None:
    spec, out, reference = runs[case]
    result = compare(out, reference, spec)
    print(f"{case}: max rel loss diff {result.max_rel_loss:.2e}, max param diff {result.max_param_diff:.2e}")
