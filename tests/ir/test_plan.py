import pytest
import yaml

from tests.ir.test_spec import BASE
from trainplan.errors import SpecError
from trainplan.ir.loading import dump_yaml, validate
from trainplan.ir.plan import Mesh, Plan, spec_hash
from trainplan.ir.spec import Spec


def _breakdown(n: int) -> dict:
    return {"params": n, "grads": n, "optimizer": 6 * n, "activations": 2 * n, "overhead": 0}


def make_plan(**overrides) -> dict:
    spec = validate(Spec, BASE)
    stages = [
        {
            "index": i,
            "units": [f"layers.{i}"],
            "modules": [f"layers.{i}"],
            "ranks": [Mesh(pp=8, dp=16, tp=8).rank(i, d, t) for d in range(16) for t in range(8)],
            "params": 100,
            "memory_bytes": 1000,
            "memory_breakdown": _breakdown(100),
            "fwd_time_s": 0.1,
            "bwd_time_s": 0.2,
        }
        for i in range(8)
    ]
    plan = {
        "spec": spec.model_dump(mode="json", by_alias=True),
        "spec_hash": spec_hash(spec),
        "mesh": {"pp": 8, "dp": 16, "tp": 8},
        "micro_batch": 1,
        "num_microbatches": 96,
        "schedule": "1f1b",
        "zero": 1,
        "recompute": "full",
        "sequence_parallel": False,
        "allreduce": "native",
        "sync": "sync",
        "compression": "none",
        "stages": stages,
        "model": {"params": 174615846912, "flops_per_sample": 2.2e15, "layers": 96},
        "estimate": {
            "step_time_s": 10.0,
            "samples_per_s": 153.6,
            "tokens_per_s": 314572.8,
            "tflops_per_device": 150.0,
            "mfu": 0.48,
            "memory_per_device_bytes": 1000,
            "memory_breakdown": _breakdown(100),
            "comm_time_s": {"dp": 0.1, "tp": 1.0, "pp": 0.2},
            "bubble_fraction": 0.07,
        },
    }
    plan.update(overrides)
    return plan


def test_plan_round_trips_byte_identically():
    plan = validate(Plan, make_plan())
    text = dump_yaml(plan)
    again = validate(Plan, yaml.safe_load(text))
    assert again == plan and dump_yaml(again) == text


def test_mesh_rank_is_row_major_with_tp_fastest():
    mesh = Mesh(pp=2, dp=3, tp=4)
    ranks = [mesh.rank(p, d, t) for p in range(2) for d in range(3) for t in range(4)]
    assert ranks == list(range(24))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num_microbatches": 95}, "must equal training.global_batch"),
        ({"mesh": {"pp": 8, "dp": 16, "tp": 4}}, "but the cluster has 1024"),
        ({"spec_hash": "0" * 64}, "the plan was edited"),
        ({"schedule": "auto"}, "schedule"),
    ],
)
def test_inconsistent_plans_are_refused(override, message):
    with pytest.raises(SpecError, match=message):
        validate(Plan, make_plan(**override), "plan.yaml")
