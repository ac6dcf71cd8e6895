"""Kubernetes: a Kubeflow Training Operator ``PyTorchJob`` and the ``ConfigMap`` holding the plan.

The job has one ``Master`` replica and ``nodes - 1`` ``Worker`` replicas; each pod runs one
torchrun agent (:func:`torchrun_command`) with ``devices_per_node`` workers. The agents meet in a
c10d rendezvous hosted by the master pod (``<job>-master-0:<port>``, the Training Operator's
per-replica service). The plan is mounted read-only from the ConfigMap at
``/etc/trainplan/plan.yaml``; results go to ``/trainplan/out``, a PersistentVolumeClaim when
``output_claim`` is given (an emptyDir, lost with the pod, otherwise).

NCCL plans request ``nvidia.com/gpu`` per pod; gloo plans request CPUs (one per process) and the
memory of the plan's device per process. With ``max_restarts > 0`` the job carries an
``elasticPolicy`` (c10d, ``minReplicas = maxReplicas = nodes``: a plan's mesh needs every node,
so restarts re-form the same world) and pods restart on failure.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from trainplan.ir.plan import Plan
from trainplan.runtime.launchers.command import AGENT_ENV, RDZV_BACKEND, Checkpointing, torchrun_command, worker_command
from trainplan.runtime.launchers.request import (
    LaunchError,
    Shape,
    check_checkpointing,
    check_max_restarts,
    check_port,
    check_request,
    time_limit_s,
)

API_VERSION = "kubeflow.org/v1"
PLAN_DIR = "/etc/trainplan"
PLAN_KEY = "plan.yaml"
CONTAINER_OUT = "/trainplan/out"
CONTAINER_NAME = "pytorch"
"""The Training Operator requires a container of this name in every replica."""
PORT_NAME = "pytorchjob-port"
"""The operator reads the rendezvous/master port from the container port of this name."""
DEFAULT_PORT = 23456
MANIFEST_NAME = "pytorchjob.yaml"
CONFIGMAP_LIMIT_BYTES = 1024 * 1024
"""Kubernetes refuses ConfigMaps larger than 1 MiB."""
_MAX_JOB_NAME = 40  # leaves room for "-worker-<index>" and "-plan" within the 63-character label limit


def job_name(plan: Plan) -> str:
    """A DNS-1035 label for the job, from the spec's name: lower case, digits and '-', starting with a letter."""
    slug = re.sub(r"[^a-z0-9-]+", "-", plan.spec.name.lower()).strip("-")
    if not slug or not slug[0].isalpha():
        slug = f"trainplan-{slug}".rstrip("-")
    return slug[:_MAX_JOB_NAME].rstrip("-")


def _dns_label(value: str, what: str) -> str:
    """``value`` if Kubernetes accepts it as a name (DNS-1035 label, short enough for the pods' names)."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", value) or len(value) > _MAX_JOB_NAME:
        raise LaunchError(f"{what} {value!r} is not a Kubernetes name: use at most {_MAX_JOB_NAME} lower-case "
                          "letters, digits and '-', starting with a letter and not ending with '-'")
    return value


def render_configmap(plan_path: str | Path, *, job: str, namespace: str) -> dict[str, Any]:
    """The ConfigMap ``<job>-plan`` holding the plan file's text under the key ``plan.yaml``."""
    text = Path(plan_path).read_text()
    if len(text.encode()) > CONFIGMAP_LIMIT_BYTES:
        raise LaunchError(f"{plan_path} is {len(text.encode())} bytes, more than a ConfigMap holds (1 MiB); "
                          "re-plan with fewer alternatives kept (`trainplan plan SPEC --top 3`)")
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{job}-plan", "namespace": namespace, "labels": _labels(job)},
            "data": {PLAN_KEY: text}}


def render_pytorchjob(plan: Plan, plan_path: str | Path, *, image: str, namespace: str = "default",
                      max_restarts: int = 0, time: str | None = None, port: int = DEFAULT_PORT,
                      output_claim: str | None = None, command: Sequence[str] | None = None,
                      nodes: int | None = None, name: str | None = None, python: str = "python",
                      checkpoint: Checkpointing | None = None) -> dict[str, Any]:
    """The PyTorchJob running ``plan``; its plan comes from the ConfigMap ``<name>-plan`` (:func:`render_configmap`).

    ``time`` (Slurm's forms, e.g. ``02:00:00``) becomes ``runPolicy.activeDeadlineSeconds``;
    ``command`` replaces the per-rank program (default :func:`worker_command`); ``python`` is the
    container's interpreter. ``checkpoint`` adds the checkpoint flags to the worker; its folder
    (default ``/trainplan/out/ckpt``) must be on the ``output_claim`` volume, which every pod mounts,
    so the claim is required (ReadWriteMany when the job has several pods).
    """
    shape = check_request(plan, nodes)
    if not image:
        raise LaunchError("--image is required on Kubernetes: a container image with trainplan and torch installed")
    _dns_label(namespace, "--namespace")
    checkpoint = _container_checkpoint(check_checkpointing(checkpoint), output_claim, command)
    if command is None:
        command = worker_command(f"{PLAN_DIR}/{PLAN_KEY}", CONTAINER_OUT, python=python, checkpoint=checkpoint)
    job = _Job(_dns_label(name, "--name") if name else job_name(plan), image, check_port(port),
               check_max_restarts(max_restarts), output_claim, list(command), python)
    spec: dict[str, Any] = {"runPolicy": _run_policy(max_restarts, time), "nprocPerNode": str(shape.nproc_per_node)}
    if max_restarts > 0:
        spec["elasticPolicy"] = {"rdzvBackend": RDZV_BACKEND, "rdzvHost": job.master, "rdzvPort": port,
                                 "minReplicas": shape.nodes, "maxReplicas": shape.nodes, "maxRestarts": max_restarts}
    spec["pytorchReplicaSpecs"] = {"Master": _replica(plan, shape, job, "Master", 1)}
    if shape.nodes > 1:
        spec["pytorchReplicaSpecs"]["Worker"] = _replica(plan, shape, job, "Worker", shape.nodes - 1)
    metadata = _metadata(plan, plan_path, job, namespace)
    if checkpoint is not None:
        metadata["annotations"]["trainplan.dev/checkpoint-dir"] = checkpoint.folder(CONTAINER_OUT)
        metadata["annotations"]["trainplan.dev/checkpoint-claim"] = str(output_claim)
    return {"apiVersion": API_VERSION, "kind": "PyTorchJob", "metadata": metadata, "spec": spec}


def _container_checkpoint(checkpoint: Checkpointing | None, output_claim: str | None,
                          command: Sequence[str] | None) -> Checkpointing | None:
    """The checkpoint settings with the folder as the containers see it, on the shared output volume."""
    if checkpoint is None:
        return None
    if command is not None:
        raise LaunchError("checkpoint flags apply to trainplan's worker, not to a replaced per-rank command")
    if not output_claim:
        raise LaunchError("checkpoints on Kubernetes need --output-claim: a PersistentVolumeClaim (ReadWriteMany for "
                          f"several pods) mounted at {CONTAINER_OUT} in every pod; a pod's own emptyDir is not "
                          "shared between pods and is lost when the pod goes")
    folder = PurePosixPath(checkpoint.folder(CONTAINER_OUT))
    if not folder.is_absolute() or not folder.is_relative_to(CONTAINER_OUT) or ".." in folder.parts:
        raise LaunchError(f"--checkpoint-dir {folder}: on Kubernetes the checkpoints go on the output volume; use a "
                          f"folder under {CONTAINER_OUT} (default {CONTAINER_OUT}/ckpt)")
    return replace(checkpoint, directory=str(folder))


def _metadata(plan: Plan, plan_path: str | Path, job: "_Job", namespace: str) -> dict[str, Any]:
    """Name, namespace, labels, and annotations tying the job to its spec and to the exact plan file."""
    digest = hashlib.sha256(Path(plan_path).read_bytes()).hexdigest()
    return {"name": job.name, "namespace": namespace, "labels": _labels(job.name),
            "annotations": {"trainplan.dev/spec-hash": plan.spec_hash, "trainplan.dev/plan-sha256": digest}}


def render_kubernetes(plan: Plan, plan_path: str | Path, **options: Any) -> str:
    """The ConfigMap and the PyTorchJob as one YAML stream, ready for ``kubectl apply -f -``."""
    job = render_pytorchjob(plan, plan_path, **options)
    configmap = render_configmap(plan_path, job=job["metadata"]["name"], namespace=job["metadata"]["namespace"])
    text = yaml.dump_all([configmap, job], Dumper=_BlockDumper, sort_keys=False, default_flow_style=False)
    folder = job["metadata"]["annotations"].get("trainplan.dev/checkpoint-dir")
    if folder is None:
        return text
    return (f"# checkpoints: {folder} on PersistentVolumeClaim {options['output_claim']}, mounted in every pod (a shared\n"
            "# volume: every rank writes its shards there, rank 0 commits); a restarted pod or worker group resumes\n"
            "# from the newest complete checkpoint there.\n" + text)


class _BlockDumper(yaml.SafeDumper):
    """Safe YAML whose multi-line strings (the plan in the ConfigMap) are written as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_BlockDumper.add_representer(str, _represent_str)


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "trainplan", "app.kubernetes.io/instance": name}


def _run_policy(max_restarts: int, time: str | None) -> dict[str, Any]:
    policy: dict[str, Any] = {"cleanPodPolicy": "None"}
    if max_restarts > 0:
        policy["backoffLimit"] = max_restarts
    if time is not None:
        policy["activeDeadlineSeconds"] = time_limit_s(time)
    return policy


@dataclass(frozen=True, slots=True)
class _Job:
    """What every replica of one job shares."""

    name: str
    image: str
    port: int
    max_restarts: int
    output_claim: str | None
    rank_command: list[str]
    python: str

    @property
    def master(self) -> str:
        """The master pod's service name: the rendezvous host."""
        return f"{self.name}-master-0"


def _replica(plan: Plan, shape: Shape, job: _Job, role: str, count: int) -> dict[str, Any]:
    """One replica type: ``count`` pods, each a torchrun agent; the master pod hosts the rendezvous."""
    agent = torchrun_command(nnodes=shape.nodes, nproc_per_node=shape.nproc_per_node,
                             endpoint=f"{job.master}:{job.port}", run_id=job.name, rank_command=job.rank_command,
                             max_restarts=job.max_restarts, python=job.python,
                             extra=["--rdzv-conf", f"is_host={int(role == 'Master')}"])
    container = {
        "name": CONTAINER_NAME, "image": job.image, "command": agent,
        "env": [{"name": key, "value": value} for key, value in AGENT_ENV.items()],
        "ports": [{"name": PORT_NAME, "containerPort": job.port}],
        "resources": _resources(plan, shape),
        "volumeMounts": [{"name": "plan", "mountPath": PLAN_DIR, "readOnly": True},
                         {"name": "out", "mountPath": CONTAINER_OUT},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    out = {"persistentVolumeClaim": {"claimName": job.output_claim}} if job.output_claim else {"emptyDir": {}}
    plan_items = [{"key": PLAN_KEY, "path": PLAN_KEY}]
    volumes = [{"name": "plan", "configMap": {"name": f"{job.name}-plan", "items": plan_items}},
               {"name": "out", **out},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    return {"replicas": count, "restartPolicy": "OnFailure" if job.max_restarts > 0 else "Never",
            "template": {"spec": {"containers": [container], "volumes": volumes}}}


def _resources(plan: Plan, shape: Shape) -> dict[str, Any]:
    """GPUs for NCCL plans; for gloo plans a CPU and the plan's device memory per process."""
    if shape.gpus:
        return {"limits": {"nvidia.com/gpu": shape.nproc_per_node}}
    memory = f"{shape.nproc_per_node * plan.spec.cluster.device.memory // 2**20}Mi"
    amount = {"cpu": str(shape.nproc_per_node), "memory": memory}
    return {"requests": dict(amount), "limits": dict(amount)}


def apply_kubernetes(manifests: str, out_dir: str | Path) -> str:
    """Write the manifests to ``OUT/pytorchjob.yaml`` and ``kubectl apply`` them; return kubectl's output."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise LaunchError("kubectl was not found on PATH: install it and point it at the cluster, or print the "
                          "manifests with --dry-run and apply them with `kubectl apply -f -`")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST_NAME
    path.write_text(manifests)
    done = subprocess.run([kubectl, "apply", "-f", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LaunchError(f"kubectl apply -f {path} failed (exit {done.returncode}): "
                          f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()
