"""CPU workers and the reference run compute with subnormal floats flushed to zero."""

from __future__ import annotations

import pytest
import torch

from trainplan.runtime.precision import denormals_flushed, flush_denormals, flushing_denormals

SUBNORMAL = 1e-39  # below fp32's smallest normal number, 1.1755e-38


@pytest.fixture
def restore_denormals():  # noqa: ANN201
    yield
    torch.set_flush_denormal(False)


def test_subnormals_are_flushed_on_cpu(restore_denormals) -> None:  # noqa: ANN001
    torch.set_flush_denormal(False)
    x = torch.tensor([SUBNORMAL], dtype=torch.float32)
    assert float(x * 1.0) > 0  # kept without flushing
    if not flush_denormals(torch.device("cpu")):
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal returned False)")
    assert float(x * 1.0) == 0.0
    assert float(torch.tensor([2e-38], dtype=torch.float32) * 1.0) > 0  # normal numbers are untouched


def test_other_devices_are_left_alone() -> None:
    assert flush_denormals(torch.device("meta")) is False


def test_a_run_inside_a_callers_process_restores_its_setting() -> None:
    torch.set_flush_denormal(False)
    with denormals_flushed(torch.device("cpu")):
        inside = flushing_denormals()
    assert flushing_denormals() is False
    assert inside or not torch.set_flush_denormal(True)  # flushed inside, where the CPU can
    torch.set_flush_denormal(False)
