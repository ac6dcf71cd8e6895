"""Plans for the launcher tests, made once per session by the planner from tiny MLP specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainplan import api
from trainplan.ir.loading import dump_yaml

def _spec(name: str, cluster: dict[str, Any], world: int, steps: int = 2) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"catalogue": "mlp", "args": {"input_dim": 12, "hidden": 24, "layers": 3, "classes": 10}},
        "task": {"kind": "classification"},
        "training": {"global_batch": 4 * world, "steps": steps, "optimizer": "sgd", "lr": 0.01, "seed": 1},
        "cluster": cluster,
        "parallel": {"dp": world, "tp": 1, "pp": 1},
    }


SHAPES = {
    "cpu_2x2": ("tiny-mlp", {"preset": "cpu-local", "nodes": 2, "devices_per_node": 2}, 4),
    "cpu_1x2": ("tiny-mlp-one-node", {"preset": "cpu-local", "nodes": 1, "devices_per_node": 2}, 2),
    "gpu_2x8": ("Tiny MLP on A100s", {"preset": "a100-80g", "nodes": 2}, 16),
    "cpu_2x2_4_steps": ("tiny-mlp-4-steps", {"preset": "cpu-local", "nodes": 2, "devices_per_node": 2}, 4, 4),
}


@pytest.fixture(scope="session")
def plan_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Plan files by shape: ``cpu_2x2`` (gloo, 2 nodes x 2), ``cpu_1x2``, ``gpu_2x8`` (NCCL, 2 nodes x 8 A100) and
    ``cpu_2x2_4_steps`` (4 training steps, for checkpoint and restart)."""
    folder = tmp_path_factory.mktemp("plans")
    files = {}
    for key, (name, cluster, world, *steps) in SHAPES.items():
        plan, _ = api.plan(api.spec_from_dict(_spec(name, cluster, world, *steps)))
        files[key] = folder / f"{key}.yaml"
        files[key].write_text(dump_yaml(plan))
    return files
