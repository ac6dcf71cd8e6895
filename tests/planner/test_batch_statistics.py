"""Plans that split the batch of a BatchNorm model say that they do not reproduce one process."""

from __future__ import annotations

import pytest

from trainplan import api
from trainplan.ir.loading import validate
from trainplan.ir.spec import Spec


def _plan(norm: str, **parallel: object):  # noqa: ANN202
    spec = validate(Spec, {"name": "cnn", "model": {"catalogue": "cnn", "args": {"norm": norm, "widths": [8, 16]}},
                           "training": {"global_batch": 8}, "cluster": {"preset": "cpu-local", "devices_per_node": 2},
                           "parallel": parallel})
    return api.plan(spec)[0]


def _batch_notes(plan) -> list[str]:  # noqa: ANN001
    return [n for n in plan.notes if n.startswith("batch statistics")]


def test_split_batch_of_batchnorm_model_is_flagged_with_the_layers() -> None:
    plan = _plan("batch", dp=2)
    (note,) = _batch_notes(plan)
    assert "BatchNorm" in note and "layers.0.bn1" in note and f"micro-batch of {plan.micro_batch}" in note


@pytest.mark.parametrize("parallel", [{"dp": 2}, {"pp": 2}])
def test_groupnorm_model_has_no_such_note(parallel: dict[str, int]) -> None:
    assert _batch_notes(_plan("group", **parallel)) == []


def test_whole_batch_in_one_micro_batch_is_not_flagged() -> None:
    spec = validate(Spec, {"name": "cnn", "model": {"catalogue": "cnn", "args": {"widths": [8, 16]}},
                           "training": {"global_batch": 8}, "cluster": {"preset": "cpu-local", "devices_per_node": 1}})
    plan = api.plan(spec)[0]
    assert plan.micro_batch == 8 or _batch_notes(plan)  # flagged exactly when the batch is split
    if plan.micro_batch == 8:
        assert _batch_notes(plan) == []
