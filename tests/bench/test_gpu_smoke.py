"""bench/gpu_smoke.py: its ~1B bf16 GPT plans for one GPU of each preset, and it skips without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.bench.scripts import load_bench


def _module():  # noqa: ANN202
    return load_bench("gpu_smoke")


@pytest.mark.parametrize("preset", ["h200", "a100-80g"])
def test_the_smoke_model_is_about_1b_and_fits_one_gpu(preset: str) -> None:
    from trainplan import api

    plan, _ = api.plan(_module().spec(18, 6, preset))
    assert 0.95e9 < plan.model.params < 1.1e9
    assert (plan.mesh.world_size, plan.spec.cluster.backend, plan.spec.training.precision) == (1, "nccl", "bf16")
    assert plan.estimate.memory_per_device_bytes <= plan.spec.cluster.device.memory


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_without_a_gpu_it_says_so_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert _module().main([]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
