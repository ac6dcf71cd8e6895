"""Dedicated parameter-server ranks (``comm.ps_placement: dedicated``): 2 workers + 2 server-only ranks.

One sweep of 4 gloo processes runs the synchronous PS (Adam) and the asynchronous PS with s = 0
(SGD); both must equal the single-process run (losses within 1e-5, final parameters). A plan
launched with the wrong number of processes is refused naming workers and servers, and a
server that dies is named as the rank that failed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.equivalence import compare, run_cases
from tests.runtime.plans import gpt_spec, make_plan
from trainplan.ir.loading import validate
from trainplan.ir.plan import spec_hash
from trainplan.ir.spec import CommSpec, Spec
from trainplan.models import build_model
from trainplan.runtime.errors import WorldSizeError
from trainplan.runtime.launch import launch
from trainplan.runtime.mesh import check_world_size

WORKERS, SERVERS = 2, 2
N = WORKERS + SERVERS
DEDICATED = {"ps_servers": SERVERS, "ps_placement": "dedicated"}
ADAM = validate(Spec, gpt_spec(N, lr=1e-3))
SGD = validate(Spec, gpt_spec(N, optimizer="sgd", lr=0.5))
CASES = {
    "ps-dedicated-sync": (ADAM, dict(dp=WORKERS, allreduce="ps", comm=DEDICATED)),
    "ps-dedicated-async-s0-sgd": (SGD, dict(dp=WORKERS, allreduce="ps", sync="async",
                                            comm={**DEDICATED, "staleness": 0})),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Spec, Path, Path]]:
    return run_cases(CASES, tmp_path_factory.mktemp("ps-dedicated"), nproc=N)


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_dedicated_servers_equal_single_process(case: str, runs: dict[str, tuple[Spec, Path, Path]]) -> None:
    spec, out, reference = runs[case]
    result = compare(out, reference, spec)
    print(f"{case}: max rel loss diff {result.max_rel_loss:.2e}, max param diff {result.max_param_diff:.2e}")


@pytest.mark.slow
def test_dedicated_servers_serve_every_step(runs: dict[str, tuple[Spec, Path, Path]]) -> None:
    """Per step each worker pushes each server its shard (fp32 + a 24-byte header) and each server
    replies to each worker (fp32 + 16 bytes): 2W(4N) + W·S·24 + W·S·16 bytes, the servers' replies
    counted on the server ranks. Only servers that really ran the exchange produce these bytes."""
    numel = sum(p.numel() for p in build_model(ADAM.model, ADAM.task, device="meta").module.parameters())
    expected = 2 * WORKERS * 4 * numel + WORKERS * SERVERS * (24 + 16)
    for case in CASES:
        out = runs[case][1]
        assert [m["wire_bytes"] for m in metrics(out)] == [expected] * 3, case
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == N and summary["ps_servers_dedicated"] == SERVERS
        assert len(summary["rank_wall_s"]) == WORKERS  # losses and times come from the workers only
    assert [m["staleness_max"] for m in metrics(runs["ps-dedicated-sync"][1])] == [0, 0, 0]


def test_wrong_process_count_is_refused_naming_the_servers(tmp_path: Path) -> None:
    plan = make_plan(ADAM, dp=WORKERS, allreduce="ps", comm=DEDICATED)
    assert plan.world_size == N and plan.mesh.world_size == WORKERS
    with pytest.raises(WorldSizeError) as err:
        launch(plan, nproc=WORKERS, out_dir=tmp_path)
    assert str(err.value).startswith(
        "the plan's mesh pp=1 x dp=2 x tp=1 (2 workers) + 2 dedicated parameter servers needs 4 processes, "
        "but --nproc 2 gives 2; launch 4 processes")
    assert not (tmp_path / "logs").exists()  # refused before any process started
    with pytest.raises(WorldSizeError, match="needs 4 processes, but the launcher"):
        check_world_size(plan.mesh, 5, "the launcher (WORLD_SIZE)", plan.ps_servers_dedicated)


def test_plan_and_spec_rules_of_dedicated_servers() -> None:
    with pytest.raises(ValueError, match="ps_placement: dedicated needs ps_servers"):
        CommSpec(ps_placement="dedicated")
    # the mesh covers the workers: a cluster of 4 with a dedicated-PS mesh of 4 is inconsistent
    with pytest.raises(ValueError, match=r"mesh pp x dp x tp = 4 devices \+ 2 dedicated parameter servers"):
        make_plan(ADAM, dp=4, allreduce="ps", comm=DEDICATED)
    # servers only exist for allreduce: ps; colocated servers are not extra ranks
    assert make_plan(ADAM, dp=4, allreduce="ps", comm={"ps_servers": 2}).world_size == 4


def test_spec_hash_unchanged_for_colocated_comm() -> None:
    """Specs written before ps_placement existed keep their hash; a dedicated one differs."""
    colocated = ADAM.model_copy(update={"parallel": ADAM.parallel.model_copy(
        update={"comm": CommSpec(ps_servers=3)})})
    data = colocated.model_dump(mode="json", by_alias=True)
    del data["parallel"]["comm"]["ps_placement"]
    import hashlib

    legacy = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert spec_hash(colocated) == legacy
    dedicated = ADAM.model_copy(update={"parallel": ADAM.parallel.model_copy(
        update={"comm": CommSpec(ps_servers=3, ps_placement="dedicated")})})
    assert spec_hash(dedicated) != legacy


@pytest.mark.slow
def test_a_dead_server_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Server rank 3 is killed once every worker pushed step 0: the run fails naming it."""
    monkeypatch.setenv("TRAINPLAN_FAULT", "kill:rank=3:step=1")
    plan = make_plan(SGD, dp=WORKERS, allreduce="ps", comm=DEDICATED, collective_timeout_s=10)
    assert launch(plan, nproc=N, out_dir=tmp_path) == 1
    first = (tmp_path / "error.txt").read_text().splitlines()[0]
    assert first == ("run failed: rank 3 (a dedicated parameter server) was killed by signal 9 without reporting "
                     "an error (killed, out of memory, or a crash in native code)"), first


def _spec(**parallel: Any) -> Spec:
    return validate(Spec, {**gpt_spec(N), "parallel": parallel})


def test_planner_plans_the_mesh_over_the_devices_left_for_workers() -> None:
    from trainplan import api

    plan, _ = api.plan(_spec(allreduce="ps", comm=DEDICATED))
    assert (plan.mesh.dp, plan.mesh.tp, plan.mesh.pp) == (WORKERS, 1, 1)  # not dp=1 x pp=2: the PS needs plain dp
    assert plan.world_size == N and plan.spec.cluster.world_size == N
    assert any(note.startswith("parameter servers: 2 of the 4 devices are dedicated") for note in plan.notes)
    assert plan.estimate.comm_time_s.dp > 0


@pytest.mark.parametrize(("parallel", "message"), [
    (dict(comm=DEDICATED), "ps_placement: dedicated puts parameter servers on ranks of their own, but "
                           "parallel.allreduce is 'auto'; set allreduce: ps"),
    (dict(allreduce="ps", comm={**DEDICATED, "ps_servers": N}), "leave none of the cluster's 4 devices for workers"),
    (dict(allreduce="ps", dp=4, comm=DEDICATED), r"no layout of 2 devices \(the cluster has 4, 2 of them dedicated"),
])
def test_planner_refuses_what_dedicated_servers_cannot_do(parallel: dict[str, Any], message: str) -> None:
    from trainplan import api
    from trainplan.errors import PlanningError

    with pytest.raises(PlanningError, match=message):
        api.plan(_spec(**parallel))
