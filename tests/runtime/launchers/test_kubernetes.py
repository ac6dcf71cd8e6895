"""`--on kubernetes`: a PyTorchJob (master + workers) and a ConfigMap holding the plan, checked against the API."""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import pytest
import yaml
from torch.distributed.run import get_args_parser

from tests.runtime.launchers.pytorchjob_schema import CONFIGMAP, pytorchjob_problems, structure_problems
from trainplan.ir.loading import load, validate
from trainplan.ir.plan import Plan
from trainplan.runtime.launchers import (
    DeviceCountError,
    KubernetesOptions,
    LaunchError,
    launch,
    render_kubernetes,
    render_pytorchjob,
)

IMAGE = "ghcr.io/example/trainplan:0.1"


def pytorch_container(job: dict, role: str) -> dict:
    return next(c for c in job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"]
                if c["name"] == "pytorch")


def torchrun_args(container: dict):
    command = container["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    return get_args_parser().parse_args(command[3:])


def test_gloo_plan_makes_a_master_and_a_worker_asking_for_cpus(plan_files):
    plan = load(Plan, plan_files["cpu_2x2"])
    job = render_pytorchjob(plan, plan_files["cpu_2x2"], image=IMAGE, namespace="ml")
    assert pytorchjob_problems(job) == []
    assert (job["metadata"]["name"], job["metadata"]["namespace"]) == ("tiny-mlp", "ml")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {role: r["replicas"] for role, r in replicas.items()} == {"Master": 1, "Worker": 1}
    assert {r["restartPolicy"] for r in replicas.values()} == {"Never"}
    assert "elasticPolicy" not in job["spec"] and job["spec"]["nprocPerNode"] == "2"
    for role in ("Master", "Worker"):
        container = pytorch_container(job, role)
        assert container["image"] == IMAGE
        assert container["resources"] == {"requests": {"cpu": "2", "memory": "8192Mi"},
                                          "limits": {"cpu": "2", "memory": "8192Mi"}}
        assert {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"} in container["env"]
        assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456}]
        args = torchrun_args(container)
        assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "2", "c10d")
        assert (args.rdzv_endpoint, args.rdzv_id, args.max_restarts) == ("tiny-mlp-master-0:23456", "tiny-mlp", 0)
        assert args.rdzv_conf == f"is_host={int(role == 'Master')}"
        assert args.no_python and args.training_script == "python"
        assert args.training_script_args == ["-m", "trainplan.runtime.worker", "--run-dir", "/trainplan/out",
                                             "--plan", "/etc/trainplan/plan.yaml", "--out", "/trainplan/out"]
        volumes = {v["name"]: v for v in replicas[role]["template"]["spec"]["volumes"]}
        assert volumes["plan"]["configMap"] == {"name": "tiny-mlp-plan", "items": [{"key": "plan.yaml",
                                                                                    "path": "plan.yaml"}]}
        assert volumes["out"] == {"name": "out", "emptyDir": {}}


def test_gpu_plan_with_restarts_is_elastic_and_asks_for_gpus(plan_files):
    plan = load(Plan, plan_files["gpu_2x8"])
    job = render_pytorchjob(plan, plan_files["gpu_2x8"], image=IMAGE, max_restarts=3, time="1-00:30:00",
                            output_claim="results")
    assert pytorchjob_problems(job) == []
    assert job["metadata"]["name"] == "tiny-mlp-on-a100s"
    assert job["spec"]["elasticPolicy"] == {"rdzvBackend": "c10d", "rdzvHost": "tiny-mlp-on-a100s-master-0",
                                            "rdzvPort": 23456, "minReplicas": 2, "maxReplicas": 2, "maxRestarts": 3}
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "None", "backoffLimit": 3, "activeDeadlineSeconds": 88200}
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        assert replica["restartPolicy"] == "OnFailure"
        container = pytorch_container(job, role)
        assert container["resources"] == {"limits": {"nvidia.com/gpu": 8}}
        assert torchrun_args(container).max_restarts == 3
        volumes = {v["name"]: v for v in replica["template"]["spec"]["volumes"]}
        assert volumes["out"]["persistentVolumeClaim"] == {"claimName": "results"}


def test_a_one_node_plan_is_a_master_alone(plan_files):
    job = render_pytorchjob(load(Plan, plan_files["cpu_1x2"]), plan_files["cpu_1x2"], image=IMAGE)
    assert pytorchjob_problems(job) == []
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    assert torchrun_args(pytorch_container(job, "Master")).nnodes == "1"


def test_the_stream_holds_a_configmap_whose_plan_is_the_plan_file(plan_files):
    text = render_kubernetes(load(Plan, plan_files["gpu_2x8"]), plan_files["gpu_2x8"], image=IMAGE, namespace="ml")
    configmap, job = yaml.safe_load_all(text)
    assert structure_problems(configmap, CONFIGMAP) == [] and pytorchjob_problems(job) == []
    assert configmap["metadata"] == {"name": "tiny-mlp-on-a100s-plan", "namespace": "ml",
                                     "labels": {"app.kubernetes.io/name": "trainplan",
                                                "app.kubernetes.io/instance": "tiny-mlp-on-a100s"}}
    assert configmap["data"]["plan.yaml"] == plan_files["gpu_2x8"].read_text()
    assert validate(Plan, yaml.safe_load(configmap["data"]["plan.yaml"])) == load(Plan, plan_files["gpu_2x8"])
    assert "  plan.yaml: |\n" in text  # a readable block, not one escaped string


def test_the_schema_check_catches_what_the_operator_would_refuse(plan_files):
    good = render_pytorchjob(load(Plan, plan_files["cpu_2x2"]), plan_files["cpu_2x2"], image=IMAGE, max_restarts=1)
    bad = copy.deepcopy(good)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "main"
    bad["spec"]["elasticPolicy"]["nProcPerNode"] = 2
    assert len(pytorchjob_problems(bad)) == 3
    typo = copy.deepcopy(good)
    typo["spec"]["elasticPolicy"]["rdzvBackend"] = "etcd3"
    typo["spec"]["pytorchReplicaSpecs"]["Chief"] = typo["spec"]["pytorchReplicaSpecs"]["Worker"]
    typo["spec"]["runPolicy"]["cleanPodPolicies"] = "All"
    assert len(pytorchjob_problems(typo)) == 3


@pytest.mark.parametrize("options, error, message", [
    ({"image": ""}, LaunchError, "--image is required on Kubernetes"),
    ({"image": IMAGE, "namespace": "ML_team"}, LaunchError, "--namespace 'ML_team' is not a Kubernetes name"),
    ({"image": IMAGE, "name": "-x"}, LaunchError, "--name '-x' is not a Kubernetes name"),
    ({"image": IMAGE, "nodes": 1}, DeviceCountError, "re-plan the spec for 1 node: `trainplan plan SPEC --nodes 1`"),
    ({"image": IMAGE, "time": "soon"}, LaunchError, "--time 'soon' is not a time limit"),
])
def test_bad_requests_are_refused(plan_files, options, error, message):
    with pytest.raises(error) as err:
        render_pytorchjob(load(Plan, plan_files["gpu_2x8"]), plan_files["gpu_2x8"], **options)
    assert message in str(err.value)


def test_launch_applies_with_kubectl_or_prints(plan_files, tmp_path, monkeypatch):
    stub = tmp_path / "bin" / "kubectl"
    stub.parent.mkdir()
    stub.write_text('#!/bin/bash\necho "$@" > "$STUB_DIR/kubectl-args"\necho "pytorchjob.kubeflow.org/x created"\n')
    stub.chmod(0o755)
    monkeypatch.setenv("STUB_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(stub.parent))
    text, out = io.StringIO(), tmp_path / "run"
    assert launch(plan_files["cpu_2x2"], "kubernetes", out_dir=out, stdout=text,
                  kubernetes=KubernetesOptions(image=IMAGE)) == 0
    assert (tmp_path / "kubectl-args").read_text().split() == ["apply", "-f", str(out / "pytorchjob.yaml")]
    assert "created" in text.getvalue() and "kubectl -n default logs -f tiny-mlp-master-0" in text.getvalue()
    assert [d["kind"] for d in yaml.safe_load_all((out / "pytorchjob.yaml").read_text())] == ["ConfigMap", "PyTorchJob"]
    monkeypatch.setenv("PATH", os.devnull)
    with pytest.raises(LaunchError, match="kubectl was not found on PATH"):
        launch(plan_files["cpu_2x2"], "kubernetes", out_dir=out, stdout=text, kubernetes=KubernetesOptions(image=IMAGE))


def test_checkpoints_go_on_the_shared_claim_and_every_pod_resumes(plan_files):
    from trainplan.runtime.checkpoint import CheckpointOptions
    from trainplan.runtime.launchers.command import Checkpointing
    from trainplan.runtime.worker import checkpoint_options, parse_args

    plan = load(Plan, plan_files["cpu_2x2"])
    stream = render_kubernetes(plan, plan_files["cpu_2x2"], image=IMAGE, max_restarts=2, output_claim="runs",
                               checkpoint=Checkpointing(every_steps=20, keep=4))
    assert stream.startswith("# checkpoints: /trainplan/out/ckpt on PersistentVolumeClaim runs, mounted in every pod")
    configmap, job = list(yaml.safe_load_all(stream))
    assert pytorchjob_problems(job) == []
    assert job["metadata"]["annotations"]["trainplan.dev/checkpoint-dir"] == "/trainplan/out/ckpt"
    for role in ("Master", "Worker"):
        volumes = {v["name"]: v for v in job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["volumes"]}
        assert volumes["out"]["persistentVolumeClaim"] == {"claimName": "runs"}
        rank = torchrun_args(pytorch_container(job, role)).training_script_args
        assert checkpoint_options(parse_args(rank[2:])) == CheckpointOptions(
            Path("/trainplan/out/ckpt"), every_steps=20, keep=4, resume_if_present=True)


@pytest.mark.parametrize("options, message", [
    ({}, "checkpoints on Kubernetes need --output-claim"),
    ({"output_claim": "runs", "directory": "/data/ckpt"}, "use a folder under /trainplan/out"),
    ({"output_claim": "runs", "directory": "/trainplan/out/../etc"}, "use a folder under /trainplan/out"),
])
def test_checkpoints_off_the_shared_volume_are_refused(plan_files, options, message):
    from trainplan.runtime.launchers.command import Checkpointing

    claim = options.pop("output_claim", None)
    with pytest.raises(LaunchError, match=message):
        render_pytorchjob(load(Plan, plan_files["cpu_2x2"]), plan_files["cpu_2x2"], image=IMAGE, output_claim=claim,
                          checkpoint=Checkpointing(every_steps=5, **options))
