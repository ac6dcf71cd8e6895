"""``device.collective_wait_s``: what DDP's blocking collectives add to a step on a time-sliced CPU
(:func:`trainplan.planner.gradient_sync.ddp_waits`, :func:`trainplan.planner.evaluate.pipeline_waits`)."""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainplan import api

GPT = {"catalogue": "gpt", "args": {"layers": 2, "hidden": 64, "heads": 4, "vocab": 128, "seq_len": 32}}
CNN = {"catalogue": "cnn", "args": {"classes": 10, "widths": [8, 16], "blocks": 1}}
FIXED = {"tp": 1, "pp": 1, "micro_batch": 1, "recompute": "none", "allreduce": "native", "compression": "none"}


def cluster(wait: float, backend: str = "gloo", devices: int = 4) -> dict:
    return {"preset": "cpu-local", "devices_per_node": devices, "backend": backend, "device": {"collective_wait_s": wait}}


def plan(model: dict, wait: float, backend: str = "gloo", devices: int = 4, **parallel):
    spec = {"name": "wait", "model": model, "task": {"kind": "classification" if model is CNN else "lm"},
            "training": {"global_batch": 8, "precision": "fp32", "optimizer": "adam", "steps": 1, "seed": 0},
            "cluster": cluster(wait, backend, devices), "parallel": {**FIXED, **parallel}}
    return _plan(json.dumps(spec, sort_keys=True))


@functools.lru_cache(maxsize=None)
def _plan(spec: str):  # noqa: ANN202 - the same spec is planned once per module (tracing dominates)
    return api.plan(api.spec_from_dict(json.loads(spec)))[0]


def added(model: dict, wait: float = 5e-3, devices: int = 4, **parallel) -> tuple[float, float]:
    """What the wait adds to the exposed dp sync and to the step, against the same plan without it."""
    without, with_wait = plan(model, 0.0, devices=devices, **parallel), plan(model, wait, devices=devices, **parallel)
    assert with_wait.num_microbatches == without.num_microbatches
    return (with_wait.estimate.comm_time_s.dp - without.estimate.comm_time_s.dp,
            with_wait.estimate.step_time_s - without.estimate.step_time_s)


@pytest.mark.parametrize("zero", [0, 1])
def test_ddp_waits_once_per_step_for_its_gradient_sync(zero: int) -> None:
    dp, step = added(GPT, dp=4, zero=zero)
    assert dp == pytest.approx(5e-3) and step == pytest.approx(5e-3)


@pytest.mark.parametrize("zero", [2, 3])
def test_fsdp_pays_no_wait_its_collectives_are_calibrated_in_a_training_step(zero: int) -> None:
    assert added(GPT, dp=4, zero=zero) == (pytest.approx(0.0), pytest.approx(0.0))


def test_tensor_parallelism_waits_only_for_the_data_parallel_sync() -> None:
    assert added(GPT, dp=2, tp=2, zero=0) == (pytest.approx(5e-3), pytest.approx(5e-3))
    assert added(GPT, dp=1, tp=4, zero=0) == (pytest.approx(0.0), pytest.approx(0.0))


def test_one_replica_has_nothing_to_wait_for() -> None:
    assert added(GPT, devices=1, dp=1, zero=0) == (pytest.approx(0.0), pytest.approx(0.0))


def test_batchnorm_adds_ddps_buffer_broadcast_once_per_micro_batch() -> None:
    p = plan(CNN, 5e-3, dp=4, zero=0)
    assert p.num_microbatches == 2
    dp, step = added(CNN, dp=4, zero=0)
    assert dp == pytest.approx(5e-3 * (1 + 2)) and step == pytest.approx(dp)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_stages_wait_for_each_sync_and_each_crossing_of_the_round_trip(schedule: str) -> None:
    """Under DDP the stages' syncs add up (:func:`ddp_syncs_in_chain`): one wait per stage, and no
    buffer broadcast wait in a pipeline (not measured to add anything, docs/accuracy.md). The
    transfers wait once per boundary crossing of one round trip, 2·(pp − 1)."""
    dp, step = added(CNN, dp=2, pp=2, zero=0, schedule=schedule)
    assert dp == pytest.approx(2 * 5e-3)
    assert step - dp == pytest.approx(2 * (2 - 1) * 5e-3)


def test_interleaved_stages_wait_at_every_chunk_boundary_of_the_round_trip() -> None:
    gpt4 = {**GPT, "args": {**GPT["args"], "layers": 4}}
    _, step = added(gpt4, devices=2, dp=1, pp=2, zero=0, schedule="interleaved", virtual_stages=2)
    assert step == pytest.approx(2 * (2 * 2 - 1) * 5e-3)


def test_local_sgd_waits_once_every_h_steps_and_async_never() -> None:
    period = 4
    dp, _ = added(GPT, dp=4, zero=0, sync="local_sgd", comm={"local_sgd_period": period})
    assert dp == pytest.approx(5e-3 / period)
    assert added(GPT, dp=4, zero=0, sync="async") == (pytest.approx(0.0), pytest.approx(0.0))
    # Nor the per-step loss/memory all-gather: the replicas' own loop gathers once, after the last step.
    sync, alone = plan(GPT, 0.0, dp=4, zero=0), plan(GPT, 0.0, dp=4, zero=0, sync="async")
    link = sync.spec.cluster.intra_node
    assert sync.estimate.update_time_s - alone.estimate.update_time_s == pytest.approx(3 * link.latency, rel=0.05)


def test_nccl_pays_no_wait() -> None:
    without, with_wait = plan(GPT, 0.0, "nccl", dp=4, zero=0), plan(GPT, 5e-3, "nccl", dp=4, zero=0)
    assert with_wait.estimate.step_time_s == pytest.approx(without.estimate.step_time_s)


@settings(max_examples=6, deadline=None)
@given(wait=st.floats(1e-4, 2e-2), zero=st.sampled_from([0, 1]))
def test_the_step_grows_by_exactly_the_waits(wait: float, zero: int) -> None:
    _, step = added(CNN, wait, dp=4, zero=zero)
    assert step == pytest.approx(3 * wait, rel=1e-6)
