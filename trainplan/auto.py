"""``trainplan.auto_parallelize``: plan and parallelise a model object inside a user's torchrun script.

::

    # torchrun --nproc-per-node 4 train.py
    plan, model = trainplan.auto_parallelize(my_model, (example_tokens,), training={"global_batch": 32})
    for inputs, targets in my_batches():                    # the global batch of each step
        loss = model.step(model.replica_rows(inputs), model.replica_rows(targets))

Every rank traces a meta skeleton of the model (no parameter memory is copied), plans it for the
cluster the process group runs on (or the ``cluster`` given) with the same search as
``trainplan plan``, checks that every rank arrived at the byte-identical plan, and then hands the
plan and the model to the runtime (:func:`trainplan.runtime.api.parallelize`). Keyword arguments
other than the named ones fix parallel fields, as ``parallel:`` does in a spec (``dp=2``,
``zero=3``, ``schedule="1f1b"``).

This module joins planner and runtime, so it lives above both (the runtime never imports the
planner).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from trainplan.errors import SpecError
from trainplan.ir.cluster import Cluster
from trainplan.ir.facts import TransformerFacts
from trainplan.ir.loading import dump_yaml, validate
from trainplan.ir.plan import Plan
from trainplan.ir.spec import Spec, TaskSpec
from trainplan.models import BuiltModel
from trainplan.models.imported import declared_facts
from trainplan.passes import build_graph
from trainplan.runtime.api import ParallelModel, ensure_process_group, launched_world_size, parallelize
from trainplan.runtime.errors import PlanExecutionError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
COMPUTE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_TIMEOUT_S = 600  # the Plan's default collective timeout

# CUDA device names (torch.cuda.get_device_name) -> cluster preset; first match wins.
GPU_PRESETS = (("H200", "h200"), ("H100", "h100-80g"), ("A100", "a100-80g"), ("V100", "v100-32g"))


def auto_parallelize(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    plan: Plan | None = None,
    cluster: str | Mapping[str, Any] | Cluster | None = None,
    training: Mapping[str, Any] | None = None,
    task: TaskSpec | Mapping[str, Any] | None = None,
    loss_fn: LossFn | None = None,
    facts: TransformerFacts | None = None,
    leaf_modules: Sequence[str] = (),
    name: str | None = None,
    **fixed: Any,
) -> tuple[Plan, ParallelModel]:
    """Plan ``model`` for this process group (unless ``plan`` is given) and parallelise it; ``(plan, model)``.

    - ``example_inputs``: the model's inputs (shapes and dtypes matter, values do not); their batch
      dimension is the default global batch.
    - ``cluster``: a preset name, a cluster mapping or :class:`Cluster`; default: this machine (the
      ``cpu-local`` preset for gloo, the GPU's preset for CUDA) with one device per process.
    - ``training``: spec ``training`` fields (``global_batch``, ``optimizer``, ``lr``, ``precision``, ``seed``).
    - ``task``: ``{"kind": "lm", "vocab": V, "seq_len": S}`` or a classification task; default:
      inferred from the inputs and the model's output shape.
    - ``facts``: the transformer's shape, which enables tensor parallelism and recompute in the search;
      default: the model's ``trainplan_facts()`` or its catalogue config.
    - ``**fixed``: parallel fields to honour (``dp``, ``tp``, ``pp``, ``micro_batch``, ``zero``, ...).

    Every rank must call this with the same model and arguments. Errors in the arguments are
    :class:`~trainplan.errors.SpecError` naming the argument.
    """
    _check_inputs(example_inputs)
    if plan is not None:
        if fixed or cluster is not None or training is not None:
            raise PlanExecutionError("give either plan= or planning arguments (cluster, training, parallel fields), not both")
        resolved = _task_of(task) if task is not None else None
        return plan, parallelize(model, plan, task=resolved, loss_fn=loss_fn)
    world = launched_world_size()
    cluster_data = _cluster_data(cluster, world)
    skeleton = meta_skeleton(model)
    resolved = _task_of(task) if task is not None else infer_task(skeleton, example_inputs)
    spec = _spec(model, example_inputs, resolved, cluster_data, training, fixed, name)
    if spec.cluster.world_size != world:
        raise SpecError([("cluster", f"the cluster has {spec.cluster.world_size} devices but {world} processes were "
                          "launched; describe the cluster the processes run on, or omit cluster=")])
    ensure_process_group(spec.cluster.backend, DEFAULT_TIMEOUT_S)
    found = _plan(spec, BuiltModel(skeleton, resolved, facts or model_facts(model)), leaf_modules)
    check_same_plan(found)
    return found, parallelize(model, found, task=resolved, loss_fn=loss_fn)


def _check_inputs(example_inputs: Sequence[torch.Tensor]) -> None:
    if (not isinstance(example_inputs, (tuple, list)) or not example_inputs
            or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in example_inputs)):
        raise PlanExecutionError("example_inputs: expected a non-empty tuple of batched tensors (the model's inputs)")


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors (no data is copied).

    Tied parameters stay tied: each tensor is replaced once, by identity, through deepcopy's memo.
    """
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) in memo:
            continue
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def infer_task(skeleton: nn.Module, example_inputs: Sequence[torch.Tensor]) -> TaskSpec:
    """The task a model consumes, from its inputs and output shape (run on meta).

    Integer ``(B, S)`` inputs with ``(B, S, V)`` logits: a language model (next-token loss);
    floating inputs with ``(B, C)`` logits: a classifier. Anything else needs ``task=``.
    """
    first = example_inputs[0]
    with torch.no_grad():
        try:
            out = skeleton(*(torch.empty_like(x, device="meta") for x in example_inputs))
        except Exception as exc:  # user code
            raise SpecError([("task", f"could not run the model on meta tensors to infer its task "
                              f"({type(exc).__name__}: {exc}); pass task=...")]) from None
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
    if not first.is_floating_point() and first.dim() == 2 and shape is not None and len(shape) == 3:
        return TaskSpec(kind="lm", vocab=shape[-1], seq_len=first.shape[1])
    if first.is_floating_point() and shape is not None and len(shape) == 2:
        return TaskSpec(kind="classification", input_shape=list(first.shape[1:]), classes=shape[-1])
    got = f"a tensor of shape {list(shape)}" if shape is not None else type(out).__name__
    raise SpecError([("task", f"cannot infer the task from {first.dtype} inputs of shape {list(first.shape)} and "
                      f"{got} outputs; pass task={{'kind': 'lm', 'vocab': V, 'seq_len': S}} or "
                      "{'kind': 'classification', 'input_shape': [...], 'classes': C}")])


def model_facts(model: nn.Module) -> TransformerFacts | None:
    """The model's ``trainplan_facts()``, or the facts of a catalogue model's config."""
    declared = declared_facts(model, type(model).__qualname__)
    if declared is not None:
        return declared
    config_facts = getattr(getattr(model, "config", None), "facts", None)
    facts = config_facts() if callable(config_facts) else None
    return facts if isinstance(facts, TransformerFacts) else None


def default_cluster(world: int) -> dict[str, Any]:
    """This machine, one device per process: the GPU's preset under CUDA, else ``cpu-local``."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % per_node:
        raise SpecError([("cluster", f"LOCAL_WORLD_SIZE {per_node} does not divide WORLD_SIZE {world}; pass cluster=")])
    shape = {"nodes": world // per_node, "devices_per_node": per_node}
    if not torch.cuda.is_available():
        return {"preset": "cpu-local", **shape}
    gpu = torch.cuda.get_device_name()
    for marker, preset in GPU_PRESETS:
        if marker in gpu:
            return {"preset": preset, **shape}
    raise SpecError([("cluster", f"no preset describes {gpu!r}; pass cluster= (a preset name or a cluster "
                      "mapping, e.g. written by `trainplan calibrate`)")])


def _cluster_data(cluster: str | Mapping[str, Any] | Cluster | None, world: int) -> dict[str, Any]:
    if cluster is None:
        return default_cluster(world)
    if isinstance(cluster, str):
        return {"preset": cluster}
    if isinstance(cluster, Cluster):
        return cluster.model_dump(mode="json", by_alias=True)
    if isinstance(cluster, Mapping):
        return dict(cluster)
    raise SpecError([("cluster", f"expected a preset name, a mapping or a Cluster, got {type(cluster).__name__}")])


def _task_of(task: TaskSpec | Mapping[str, Any]) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else validate(TaskSpec, dict(task), "task=")


def _spec(model: nn.Module, example_inputs: Sequence[torch.Tensor], task: TaskSpec, cluster: dict[str, Any],
          training: Mapping[str, Any] | None, fixed: dict[str, Any], name: str | None) -> Spec:
    kind = type(model)
    data = {
        "name": name or f"auto-{kind.__name__}",
        "model": {"instance": f"{kind.__module__}:{kind.__qualname__}"},
        "task": task.model_dump(mode="json", by_alias=True, exclude_none=True),
        "training": {"global_batch": int(example_inputs[0].shape[0]), **(training or {})},
        "cluster": cluster,
        "parallel": fixed,
    }
    return validate(Spec, data, "auto_parallelize arguments")


def _plan(spec: Spec, built: BuiltModel, leaf_modules: Sequence[str]) -> Plan:
    from trainplan.planner import plan_from_graph

    graph = build_graph(built, dtype=COMPUTE_DTYPE[spec.training.precision], leaf_modules=tuple(leaf_modules))
    return plan_from_graph(spec, graph)[0]


def check_same_plan(plan: Plan) -> None:
    """Every rank planned independently: refuse to go on unless all arrived at the same plan.

    Planning is deterministic for the same spec and cluster, so a difference means the ranks were
    given different models or arguments.
    """
    digest = hashlib.sha256(dump_yaml(plan).encode()).hexdigest()
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise PlanExecutionError(
            f"ranks {differing} planned differently from rank 0: every rank must call auto_parallelize with the "
            "same model and arguments"
        )
