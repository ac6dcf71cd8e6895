"""Pipeline parallelism: GPipe, 1F1B and interleaved 1F1B equal the single-process run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.runtime.equivalence import compare, final_params, run_cases
from tests.runtime.plans import gpt_spec
from trainplan.ir.loading import validate
from trainplan.ir.spec import Spec

pytestmark = pytest.mark.slow

CASES = {
    # DDP over the dp pairs of each stage; untied embedding and head
    "gpipe-pp2-dp2-zero0": (validate(Spec, gpt_spec(4, tie=False, lr=1e-3)),
                            dict(pp=2, dp=2, micro_batch=2, schedule="gpipe")),
    # FSDP2 (ZeRO-3) units inside the stages; 2 micro-batches per replica
    "1f1b-pp2-dp2-zero3": (validate(Spec, gpt_spec(4, lr=1e-3)), dict(pp=2, dp=2, micro_batch=1, schedule="1f1b", zero=3)),
    # 8 stages, 2 per rank: stage 0 holds only the embeddings, stage 7 only the head
    "interleaved-pp4-v2": (validate(Spec, gpt_spec(4, layers=6, lr=1e-3)),
                           dict(pp=4, micro_batch=2, schedule="interleaved", virtual_stages=2,
                                stages=[["wte", "wpe"]] + [[f"layers.{i}"] for i in range(6)] + [["ln_f", "lm_head"]])),
    # wte on stage 0, the same weight as lm_head on stage 1: SGD makes a missed gradient share visible
    "tied-1f1b-pp2-dp2-zero1-sgd": (validate(Spec, gpt_spec(4, optimizer="sgd", lr=0.5)),
                                    dict(pp=2, dp=2, micro_batch=1, schedule="1f1b", zero=1)),
    # a non-transformer: a ResNet with GroupNorm (per-sample statistics), SGD, micro-batched on 2 stages x 2 replicas
    "cnn-groupnorm-1f1b-pp2-dp2-sgd": (validate(Spec, {
        "name": "tiny-cnn", "model": {"catalogue": "cnn", "args": {"input_shape": [3, 8, 8], "widths": [8, 16],
                                                                    "blocks": 1, "norm": "group"}},
        "task": {"kind": "classification"},
        "training": {"global_batch": 8, "steps": 3, "optimizer": "sgd", "lr": 0.1, "seed": 3},
        "cluster": {"preset": "cpu-local", "devices_per_node": 4}}), dict(pp=2, dp=2, micro_batch=2, schedule="1f1b")),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Spec, Path, Path]]:
    return run_cases(CASES, tmp_path_factory.mktemp("pp"))


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_equals_single_process(case: str, runs: dict[str, tuple[Spec, Path, Path]]) -> None:
    spec, out, reference = runs[case]
    result = compare(out, reference, spec)
    print(f"{case}: max rel loss diff {result.max_rel_loss:.2e}, max param diff {result.max_param_diff:.2e}")


def test_tied_embedding_split_across_stages_stays_one_value(runs: dict[str, tuple[Spec, Path, Path]]) -> None:
    _, out, _ = runs["tied-1f1b-pp2-dp2-zero1-sgd"]
    params = final_params(out)
    assert torch.equal(params["lm_head.weight"], params["wte.weight"])
