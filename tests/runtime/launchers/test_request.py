"""Requests checked against the plan before any launcher starts or writes anything; `trainplan launch` flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainplan.ir.loading import load
from trainplan.ir.plan import Mesh, Plan
from trainplan.runtime.launchers import DeviceCountError, LaunchError, launch_main
from trainplan.runtime.launchers.dispatch import build_parser
from trainplan.runtime.launchers.request import check_request, plan_shape, time_limit_s


@pytest.mark.parametrize("text, seconds", [
    ("45", 45 * 60), ("10:30", 630), ("01:00:00", 3600), ("2-12", 2 * 86400 + 12 * 3600),
    ("1-02:03", 86400 + 2 * 3600 + 3 * 60), ("1-00:00:01", 86401),
])
def test_slurm_time_forms(text, seconds):
    assert time_limit_s(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "00:00:00", "1:2:3:4", "-5"])
def test_bad_times_name_the_accepted_forms(text):
    with pytest.raises(LaunchError, match="HH:MM:SS"):
        time_limit_s(text)


def test_the_plans_shape_is_the_default_request(plan_files):
    shape = check_request(load(Plan, plan_files["gpu_2x8"]))
    assert (shape.nodes, shape.nproc_per_node, shape.gpus, shape.world_size) == (2, 8, True, 16)
    shape = check_request(load(Plan, plan_files["cpu_2x2"]), nodes=2, nproc_per_node=2)
    assert (shape.nodes, shape.nproc_per_node, shape.gpus) == (2, 2, False)


def test_a_plan_whose_mesh_and_cluster_disagree_is_refused(plan_files):
    plan = load(Plan, plan_files["cpu_2x2"])
    edited = plan.model_copy(update={"mesh": Mesh(pp=1, dp=2, tp=1)})  # model_copy skips validation, as a bug might
    with pytest.raises(DeviceCountError, match=r"2 nodes x 2 devices = 4, but its mesh pp=1 x dp=2 x tp=1 needs 2"):
        plan_shape(edited)


def test_nodes_other_than_the_plans_are_refused_with_how_to_replan(plan_files):
    with pytest.raises(DeviceCountError) as err:
        check_request(load(Plan, plan_files["gpu_2x8"]), nodes=4)
    assert str(err.value) == (
        "the plan 'Tiny MLP on A100s' was made for 2 nodes x 8 devices = 16 (mesh pp=1 x dp=16 x tp=1), but the "
        "launch asks for 4 nodes x 8 = 32; launch it with --nodes 2, or re-plan the spec for 4 nodes: "
        "`trainplan plan SPEC --nodes 4` (SPEC: the spec this plan came from)")
    with pytest.raises(LaunchError, match="--nodes must be a positive number"):
        check_request(load(Plan, plan_files["gpu_2x8"]), nodes=0)


def test_launch_main_dry_runs_each_target(plan_files, tmp_path, capsys):
    plan = str(plan_files["gpu_2x8"])
    assert launch_main([plan, "--on", "slurm", "--dry-run", "--nodes", "2", "--time", "02:00:00",
                        "--partition", "gpu", "--out", str(tmp_path), "--python", "python3"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --time=02:00:00" in script and "#SBATCH --partition=gpu" in script
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1 python3 -m torch.distributed.run" in script
    assert launch_main([plan, "--on", "kubernetes", "--dry-run", "--image", "img:1", "--namespace", "ml",
                        "--max-restarts", "2", "--port", "29400"]) == 0
    configmap, job = yaml.safe_load_all(capsys.readouterr().out)
    assert configmap["kind"] == "ConfigMap" and job["spec"]["elasticPolicy"]["rdzvPort"] == 29400
    assert launch_main([str(plan_files["cpu_2x2"]), "--on", "local", "--dry-run"]) == 0
    local = capsys.readouterr().out
    assert local.count("-m torch.distributed.run") == 2
    assert local.count(f" --out {Path.cwd() / 'out' / 'tiny-mlp' / 'run'}\n") == 2  # the default, as `trainplan run`
    assert not tmp_path.joinpath("launch.sbatch").exists()


def test_launch_main_refuses_a_mismatched_request_and_bad_flags(plan_files, capsys):
    with pytest.raises(DeviceCountError, match="`trainplan plan SPEC --nodes 3`"):
        launch_main([str(plan_files["cpu_2x2"]), "--on", "slurm", "--dry-run", "--nodes", "3"])
    with pytest.raises(SystemExit):
        launch_main([str(plan_files["cpu_2x2"]), "--on", "mesos"])
    assert "invalid choice: 'mesos'" in capsys.readouterr().err


def test_a_spec_given_instead_of_a_plan_points_to_trainplan_plan(repo, capsys):
    with pytest.raises(LaunchError, match=r"is a spec, not a plan: make the plan first with `trainplan plan "):
        launch_main([str(repo / "plans" / "laptop-gpt-tiny.yaml"), "--on", "local", "--dry-run"])


def test_the_launch_page_documents_every_flag(repo):
    page = (repo / "docs" / "launch.md").read_text()
    flags = [o for action in build_parser()._actions for o in action.option_strings if o.startswith("--")]
    assert [f for f in flags if f"`{f}" not in page and f != "--help"] == []
