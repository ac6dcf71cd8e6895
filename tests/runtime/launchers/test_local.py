"""`--on local`: two torchrun agents x two workers on loopback form one world of four ranks."""

from __future__ import annotations

import io
import json
import shlex

import pytest
from torch.distributed.run import get_args_parser

from tests.runtime.launchers.helpers import check_world, probe_command, rank_results
from trainplan.runtime.launchers import DeviceCountError, LaunchError, launch, launch_local
from trainplan.runtime.launchers.local import _gpu_sets
from trainplan.runtime.launchers.request import Shape


def test_two_agents_of_two_form_one_world_and_survive_a_restart(plan_files, tmp_path):
    # Rank 3 fails in the first attempt; with one restart allowed both agents re-form the same world.
    out = tmp_path / "run"
    code = launch_local(plan_files["cpu_2x2"], nodes=2, nproc_per_node=2, out_dir=out, max_restarts=1,
                        command=probe_command(plan_files["cpu_2x2"], out, "--fail-first-attempt", "3"),
                        timeout_s=120, console=False)
    assert code == 0, (out / "agents" / "node-1.log").read_text()[-3000:]
    results = rank_results(out)
    check_world(results, nodes=2, nproc=2)
    # Node 1's agent restarted its failed group (restart count 1); node 0's joined the new round without
    # spending a restart of its own. Only the new round can have written results: the first never formed.
    assert {r["attempt"] for r in results.values() if r["env"]["GROUP_RANK"] == "1"} == {1}
    assert {r["attempt"] for r in results.values() if r["env"]["GROUP_RANK"] == "0"} == {0}
    assert {r["env"]["MASTER_ADDR"] for r in results.values()} == {"127.0.0.1"}
    assert {r["plan"] for r in results.values()} == {str(plan_files["cpu_2x2"])}
    assert sorted(p.name for p in (out / "agents").iterdir()) == ["node-0.log", "node-1.log"]


def test_the_default_worker_trains_the_plan(plan_files, tmp_path):
    # One node keeps it quick: the multi-node rendezvous is proven by the probe above; this proves the
    # default per-rank command (worker_command) runs the plan.
    out = tmp_path / "run"
    code = launch_local(plan_files["cpu_1x2"], out_dir=out, timeout_s=120, console=False)
    assert code == 0, (out / "agents" / "node-0.log").read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_failed_rank_stops_the_launch_and_names_its_node(plan_files, tmp_path, capfd):
    out = tmp_path / "run"
    code = launch_local(plan_files["cpu_2x2"], out_dir=out, command=probe_command(
        plan_files["cpu_2x2"], out, "--fail-first-attempt", "3", "--timeout-s", "20"), timeout_s=120, console=False)
    assert code != 0
    err = capfd.readouterr().err
    assert "local launch failed: node" in err and "torchrun agent exited with code" in err
    assert not list(out.glob("rank-*.json"))


@pytest.mark.parametrize("nodes, nproc, words", [
    (1, 2, ["2 nodes x 2 processes = 4", "1 node x 2 = 2", "--nodes 2", "`trainplan plan SPEC --nodes 1`"]),
    (4, 1, ["the device count matches but the split does not", "--nodes 2"]),
    (3, None, ["3 nodes x 2 = 6", "`trainplan plan SPEC --nodes 3`"]),
])
def test_a_request_that_is_not_the_plans_shape_is_refused_before_starting(plan_files, tmp_path, nodes, nproc, words):
    with pytest.raises(DeviceCountError) as err:
        launch_local(plan_files["cpu_2x2"], nodes=nodes, nproc_per_node=nproc, out_dir=tmp_path / "run")
    for word in words:
        assert word in str(err.value)
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_one_torchrun_agent_per_node_on_loopback(plan_files, tmp_path):
    text = io.StringIO()
    assert launch(plan_files["cpu_2x2"], "local", dry_run=True, out_dir=tmp_path / "run", stdout=text) == 0
    agents = [line for line in text.getvalue().splitlines() if not line.startswith("#")]
    assert len(agents) == 2
    for node, line in enumerate(agents):
        words = shlex.split(line)
        env = dict(w.split("=", 1) for w in words[:words.index(next(w for w in words if "=" not in w))])
        assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
        args = get_args_parser().parse_args(words[len(env) + 3:])  # after `ENV... python -m torch.distributed.run`
        assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "2", "c10d")
        assert args.rdzv_endpoint.startswith("127.0.0.1:") and args.local_addr == "127.0.0.1"
        assert args.rdzv_conf == f"is_host={int(node == 0)}" and args.no_python
        assert args.training_script_args[:2] == ["-m", "trainplan.runtime.worker"]
        assert str(plan_files["cpu_2x2"]) in args.training_script_args
    assert not (tmp_path / "run").exists()


def test_gpu_plans_give_each_local_node_its_own_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert _gpu_sets(Shape(nodes=2, nproc_per_node=2, gpus=True)) == ["4,5", "6,7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(LaunchError, match="2 nodes x 2 GPUs = 4, but this host has 2 visible"):
        _gpu_sets(Shape(nodes=2, nproc_per_node=2, gpus=True))
