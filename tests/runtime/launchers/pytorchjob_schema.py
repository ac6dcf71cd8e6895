"""A structural check of PyTorchJob and ConfigMap manifests, written from the Training Operator's API.

Field names, types and enums follow the kubeflow.org/v1 types (``PyTorchJobSpec``, ``ElasticPolicy``,
``RunPolicy``, ``ReplicaSpec``) and the Kubernetes core types the pods use; unknown keys are
errors, as the API server's structural schema prunes or rejects them. On top of the types, the
rules the operator's validation enforces: replica types Master/Worker only, one Master, a
container named ``pytorch`` with an image in every replica, not both ``nprocPerNode`` and the
deprecated ``elasticPolicy.nProcPerNode``, and a DNS-1035 job name. Only the fields a trainplan
manifest may use are listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Obj:
    fields: dict[str, Any]
    required: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class MapOf:
    value: Any
    keys: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Enum:
    values: tuple[object, ...]


QUANTITY = (int, str)
LABELS = MapOf(str)
OBJECT_META = Obj({"name": str, "namespace": str, "labels": LABELS, "annotations": LABELS})
CONTAINER = Obj({
    "name": str, "image": str, "command": ListOf(str), "args": ListOf(str),
    "env": ListOf(Obj({"name": str, "value": str}, frozenset({"name"}))),
    "ports": ListOf(Obj({"name": str, "containerPort": int, "protocol": Enum(("TCP", "UDP", "SCTP"))},
                        frozenset({"containerPort"}))),
    "resources": Obj({"limits": MapOf(QUANTITY), "requests": MapOf(QUANTITY)}),
    "volumeMounts": ListOf(Obj({"name": str, "mountPath": str, "readOnly": bool, "subPath": str},
                               frozenset({"name", "mountPath"}))),
}, frozenset({"name"}))
VOLUME = Obj({
    "name": str,
    "configMap": Obj({"name": str, "items": ListOf(Obj({"key": str, "path": str}, frozenset({"key", "path"}))),
                      "defaultMode": int}),
    "emptyDir": Obj({"medium": Enum(("", "Memory")), "sizeLimit": QUANTITY}),
    "persistentVolumeClaim": Obj({"claimName": str, "readOnly": bool}, frozenset({"claimName"})),
}, frozenset({"name"}))
POD_TEMPLATE = Obj({"metadata": OBJECT_META, "spec": Obj({"containers": ListOf(CONTAINER), "volumes": ListOf(VOLUME)},
                                                         frozenset({"containers"}))})
REPLICA_SPEC = Obj({"replicas": int, "template": POD_TEMPLATE,
                    "restartPolicy": Enum(("Always", "OnFailure", "Never", "ExitCode"))})
RUN_POLICY = Obj({"cleanPodPolicy": Enum(("All", "Running", "None")), "ttlSecondsAfterFinished": int,
                  "activeDeadlineSeconds": int, "backoffLimit": int, "suspend": bool,
                  "schedulingPolicy": Obj({"minAvailable": int, "queue": str, "minResources": MapOf(QUANTITY),
                                           "priorityClass": str, "scheduleTimeoutSeconds": int})})
ELASTIC_POLICY = Obj({
    "minReplicas": int, "maxReplicas": int, "rdzvBackend": Enum(("c10d", "etcd", "etcd-v2")), "rdzvPort": int,
    "rdzvHost": str, "rdzvId": str, "rdzvConf": ListOf(Obj({"key": str, "value": str})), "standalone": bool,
    "nProcPerNode": int, "maxRestarts": int, "metrics": ListOf(dict),
})
PYTORCHJOB = Obj({
    "apiVersion": Enum(("kubeflow.org/v1",)), "kind": Enum(("PyTorchJob",)), "metadata": OBJECT_META,
    "spec": Obj({"runPolicy": RUN_POLICY, "elasticPolicy": ELASTIC_POLICY, "nprocPerNode": str,
                 "pytorchReplicaSpecs": MapOf(REPLICA_SPEC, keys=("Master", "Worker"))},
                frozenset({"pytorchReplicaSpecs"})),
}, frozenset({"apiVersion", "kind", "metadata", "spec"}))
CONFIGMAP = Obj({"apiVersion": Enum(("v1",)), "kind": Enum(("ConfigMap",)), "metadata": OBJECT_META,
                 "data": MapOf(str)}, frozenset({"apiVersion", "kind", "metadata"}))


def structure_problems(value: Any, schema: Any, path: str = "") -> list[str]:
    """Every place where ``value`` does not have the shape ``schema`` describes."""
    if isinstance(schema, Obj):
        if not isinstance(value, dict):
            return [f"{path or '.'}: expected an object, got {type(value).__name__}"]
        out = [f"{path}.{key}: unknown field" for key in value if key not in schema.fields]
        out += [f"{path}.{key}: required field is missing" for key in schema.required if key not in value]
        for key, sub in schema.fields.items():
            if key in value:
                out += structure_problems(value[key], sub, f"{path}.{key}")
        return out
    if isinstance(schema, ListOf):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [p for i, item in enumerate(value) for p in structure_problems(item, schema.item, f"{path}[{i}]")]
    if isinstance(schema, MapOf):
        if not isinstance(value, dict):
            return [f"{path}: expected a map, got {type(value).__name__}"]
        out = [f"{path}.{k}: key not one of {schema.keys}" for k in value if schema.keys and k not in schema.keys]
        return out + [p for k, v in value.items() for p in structure_problems(v, schema.value, f"{path}.{k}")]
    if isinstance(schema, Enum):
        return [] if value in schema.values else [f"{path}: {value!r} is not one of {schema.values}"]
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool) and bool not in types:
        return [f"{path}: expected {types}, got a boolean"]
    return [] if isinstance(value, types) else [f"{path}: expected {types}, got {type(value).__name__}"]


def operator_problems(job: dict[str, Any]) -> list[str]:
    """The Training Operator's own validation rules, and references between the pod's parts."""
    out = []
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]) or len(job["metadata"]["name"]) > 63:
        out.append(f"metadata.name {job['metadata']['name']!r} is not a DNS-1035 label")
    spec = job["spec"]
    if "nprocPerNode" in spec and "nProcPerNode" in spec.get("elasticPolicy", {}):
        out.append("spec.elasticPolicy.nProcPerNode is deprecated; not both with spec.nprocPerNode")
    policy = spec.get("elasticPolicy", {})
    if policy.get("minReplicas", 0) > policy.get("maxReplicas", 1 << 30):
        out.append("elasticPolicy.minReplicas > maxReplicas")
    for role, replica in spec["pytorchReplicaSpecs"].items():
        where = f"pytorchReplicaSpecs.{role}"
        if role == "Master" and replica.get("replicas", 1) != 1:
            out.append(f"{where}: there must be only 1 master replica")
        pod = replica["template"]["spec"]
        containers = pod["containers"]
        if not any(c["name"] == "pytorch" for c in containers):
            out.append(f"{where}: no container named pytorch")
        out += [f"{where}: container {c['name']} has no image" for c in containers if not c.get("image")]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        out += [f"{where}: volumeMount {m['name']} names no volume" for c in containers
                for m in c.get("volumeMounts", []) if m["name"] not in volumes]
        out += [f"{where}: volume {v['name']} has {n} sources" for v in pod.get("volumes", [])
                if (n := len(set(v) - {"name"})) != 1]
    return out


def pytorchjob_problems(job: dict[str, Any]) -> list[str]:
    problems = structure_problems(job, PYTORCHJOB)
    return problems or operator_problems(job)
