"""The planner's tensor-parallel styles name modules the catalogue models have, so the runtime accepts them.

Bert's MLM output layer is ``head.lm_head`` (not ``lm_head`` as in gpt and llama); a plan naming
``lm_head`` is refused by the runtime ("matches no module"), and leaving it out would replicate
the vocabulary projection on every tp rank.
"""

from __future__ import annotations

from typing import Any

import pytest

from trainplan.api import plan, spec_from_dict
from trainplan.runtime.materialize import build_meta_model
from trainplan.runtime.parallelize import check_plan
from trainplan.runtime.structure import match_paths

ARGS: dict[str, dict[str, Any]] = {
    "gpt": {"layers": 2, "hidden": 32, "heads": 4, "vocab": 64, "seq_len": 16},
    "llama": {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2, "vocab": 64, "seq_len": 16, "multiple_of": 16},
    "bert": {"layers": 2, "hidden": 32, "heads": 4, "vocab": 64, "seq_len": 16},
}
OUTPUT_LAYER = {"gpt": "lm_head", "llama": "lm_head", "bert": "head.lm_head"}


@pytest.mark.parametrize("name", list(ARGS))
@pytest.mark.parametrize("pp", [1, 2])
def test_tp_styles_name_modules_of_the_model(name: str, pp: int) -> None:
    spec = spec_from_dict({
        "name": f"tp-{name}", "model": {"catalogue": name, "args": ARGS[name]},
        "training": {"global_batch": 4, "steps": 1, "optimizer": "adam"},
        "cluster": {"preset": "cpu-local", "devices_per_node": 4},
        "parallel": {"dp": 4 // (2 * pp), "tp": 2, "pp": pp, "zero": 0},
    })
    p = plan(spec)[0]
    modules = [n for n, _ in build_meta_model(p.spec).module.named_modules() if n]
    unmatched = [pattern for pattern in p.tp_styles if not match_paths(pattern, modules)]
    assert not unmatched, f"{name}: tp_styles name no module: {unmatched}"
    assert p.tp_styles.get(OUTPUT_LAYER[name]) == "colwise"  # the vocabulary projection is sharded
    check_plan(p)  # the runtime accepts the plan (styles resolve, stages cut)


@pytest.mark.parametrize("name", list(ARGS))
def test_parameter_estimate_counts_what_the_plans_styles_shard(name: str) -> None:
    """tp=2, one stage: the estimated parameter bytes are those the plan's own styles leave on a rank
    (column-parallel weights and biases, row-parallel and vocabulary weights halved, the rest whole).
    Bert's ``head.lm_head`` bias was counted whole by the memory model while the plan sharded it."""
    from trainplan.planner.model_costs import tp_sharded

    spec = spec_from_dict({
        "name": f"tp-{name}", "model": {"catalogue": name, "args": ARGS[name]},
        "training": {"global_batch": 4, "steps": 1, "optimizer": "adam"},
        "cluster": {"preset": "cpu-local", "devices_per_node": 4},
        "parallel": {"dp": 2, "tp": 2, "pp": 1, "zero": 0},
    })
    p = plan(spec)[0]
    model = build_meta_model(p.spec).module
    expected = sum(4 * (t.numel() // 2 if tp_sharded(n, p.tp_styles) else t.numel())
                   for n, t in model.named_parameters())  # fp32, tied parameters once
    assert p.stages[0].memory_breakdown.params == expected
