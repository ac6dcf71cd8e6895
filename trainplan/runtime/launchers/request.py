"""What a launch asks for, checked against the plan before anything is started or written.

A plan is made for one cluster shape: ``spec.cluster.nodes`` hosts with ``devices_per_node``
accelerators (or CPU processes) each, and its mesh ``pp x dp x tp`` uses exactly that many
devices. Every launcher starts one torchrun agent per node and ``devices_per_node`` workers per
agent, so the request (``--nodes``) must be the plan's shape; anything else is refused here with
what was declared, what the plan needs, and how to re-plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainplan.errors import TrainplanError
from trainplan.ir.loading import read_yaml, validate
from trainplan.ir.plan import Plan

if TYPE_CHECKING:
    from trainplan.runtime.launchers.command import Checkpointing


class LaunchError(TrainplanError):
    """A launch cannot go ahead as requested (flags, missing tools, a job that failed to start)."""


class DeviceCountError(LaunchError):
    """The requested nodes x devices differ from what the plan was made for."""


@dataclass(frozen=True, slots=True)
class Shape:
    """The job every launcher starts: ``nodes`` torchrun agents with ``nproc_per_node`` workers each."""

    nodes: int
    nproc_per_node: int
    gpus: bool

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def load_plan(path: str | Path) -> Plan:
    """The plan saved at ``path``, with a pointer to ``trainplan plan`` when the file is a spec instead."""
    data = read_yaml(path)
    if isinstance(data, dict) and "spec_hash" not in data and "model" in data:
        raise LaunchError(f"{path} is a spec, not a plan: make the plan first with `trainplan plan {path}` "
                          "and launch the plan.yaml it writes")
    return validate(Plan, data, str(path))


def plan_shape(plan: Plan) -> Shape:
    """The plan's cluster shape, refusing a plan whose cluster and mesh disagree on the device count."""
    cluster = plan.spec.cluster
    mesh = plan.mesh
    servers = plan.ps_servers_dedicated
    if cluster.world_size != plan.world_size:  # the mesh's workers and any dedicated parameter servers
        raise DeviceCountError(
            f"the plan's cluster has {cluster.nodes} nodes x {cluster.devices_per_node} devices = "
            f"{cluster.world_size}, but its mesh pp={mesh.pp} x dp={mesh.dp} x tp={mesh.tp}"
            f"{f' + {servers} dedicated parameter servers' if servers else ''} needs "
            f"{plan.world_size}; the plan is inconsistent (edited by hand?): re-plan it with `trainplan plan SPEC`"
        )
    return Shape(cluster.nodes, cluster.devices_per_node, cluster.backend == "nccl")


def check_request(plan: Plan, nodes: int | None = None, nproc_per_node: int | None = None) -> Shape:
    """The shape to launch: the plan's, after checking that ``nodes`` / ``nproc_per_node`` (when given) agree.

    Raises :class:`DeviceCountError` naming the plan's shape, the requested one and the fix.
    """
    shape = plan_shape(plan)
    if nodes is not None and nodes < 1:
        raise LaunchError(f"--nodes must be a positive number of nodes, got {nodes}")
    if nproc_per_node is not None and nproc_per_node < 1:
        raise LaunchError(f"processes per node must be positive, got {nproc_per_node}")
    want_nodes = shape.nodes if nodes is None else nodes
    want_nproc = shape.nproc_per_node if nproc_per_node is None else nproc_per_node
    if (want_nodes, want_nproc) != (shape.nodes, shape.nproc_per_node):
        raise DeviceCountError(_mismatch(plan, shape, want_nodes, want_nproc))
    return shape


def check_max_restarts(max_restarts: int) -> int:
    """``max_restarts`` if it is a valid count of elastic restarts."""
    if max_restarts < 0:
        raise LaunchError(f"--max-restarts must be 0 (no restarts) or more, got {max_restarts}")
    return max_restarts


def check_port(port: int) -> int:
    """``port`` if it is a TCP port number."""
    if not 0 < port < 65536:
        raise LaunchError(f"--port must be a TCP port (1-65535), got {port}")
    return port


def _mismatch(plan: Plan, shape: Shape, nodes: int, nproc: int) -> str:
    mesh = plan.mesh
    requested = nodes * nproc
    what = "devices" if shape.gpus else "processes"
    have = (f"the plan '{plan.spec.name}' was made for {shape.nodes} node{'s' * (shape.nodes != 1)} x "
            f"{shape.nproc_per_node} {what} = {shape.world_size} (mesh pp={mesh.pp} x dp={mesh.dp} x tp={mesh.tp})")
    asked = f"but the launch asks for {nodes} node{'s' * (nodes != 1)} x {nproc} = {requested}"
    if requested != shape.world_size:
        fix = (f"launch it with --nodes {shape.nodes}, or re-plan the spec for {nodes} node{'s' * (nodes != 1)}: "
               f"`trainplan plan SPEC --nodes {nodes}` (SPEC: the spec this plan came from)")
    else:
        fix = (f"the device count matches but the split does not: a plan places tensor- and pipeline-parallel "
               f"groups inside nodes; launch it with --nodes {shape.nodes}, or re-plan with "
               f"`trainplan plan SPEC --nodes {nodes}` and cluster.devices_per_node: {nproc}")
    return f"{have}, {asked}; {fix}"


_TIME_FORMS = (
    (re.compile(r"^(\d+)$"), ("m",)),
    (re.compile(r"^(\d+):(\d+)$"), ("m", "s")),
    (re.compile(r"^(\d+):(\d+):(\d+)$"), ("h", "m", "s")),
    (re.compile(r"^(\d+)-(\d+)$"), ("d", "h")),
    (re.compile(r"^(\d+)-(\d+):(\d+)$"), ("d", "h", "m")),
    (re.compile(r"^(\d+)-(\d+):(\d+):(\d+)$"), ("d", "h", "m", "s")),
)
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def time_limit_s(text: str) -> int:
    """Seconds of a Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``)."""
    for pattern, units in _TIME_FORMS:
        match = pattern.match(text.strip())
        if match:
            seconds = sum(int(v) * _UNIT_S[u] for v, u in zip(match.groups(), units))
            if seconds > 0:
                return seconds
    raise LaunchError(
        f"--time {text!r} is not a time limit; use Slurm's forms: HH:MM:SS (e.g. 01:00:00), MM, MM:SS, "
        "D-HH, D-HH:MM or D-HH:MM:SS, longer than zero"
    )


def check_checkpointing(checkpoint: "Checkpointing | None") -> "Checkpointing | None":
    """``checkpoint`` if its settings are valid (positive interval and count)."""
    if checkpoint is None:
        return None
    if checkpoint.every_steps is not None and checkpoint.every_steps < 1:
        raise LaunchError(f"--checkpoint-every must be a positive number of steps, got {checkpoint.every_steps}")
    if checkpoint.every_minutes is not None and not checkpoint.every_minutes > 0:
        raise LaunchError(f"--checkpoint-minutes must be positive, got {checkpoint.every_minutes}")
    if checkpoint.keep < 1:
        raise LaunchError(f"--keep-checkpoints must be at least 1, got {checkpoint.keep}")
    if not (checkpoint.every_steps or checkpoint.every_minutes or checkpoint.resume):
        raise LaunchError("--checkpoint-dir, --keep-checkpoints and --checkpoint-async need --checkpoint-every N "
                          "or --checkpoint-minutes M (or --resume)")
    if checkpoint.asynchronous and not (checkpoint.every_steps or checkpoint.every_minutes):
        raise LaunchError("--checkpoint-async needs --checkpoint-every N or --checkpoint-minutes M")
    return checkpoint


def check_checkpoint_folder(plan: Plan, checkpoint: "Checkpointing", folder: str | Path) -> None:
    """Before starting (local) or submitting (Slurm): ``--resume`` has a complete checkpoint to load, a fresh
    launch does not write into a folder holding another run's checkpoints, and the plan can checkpoint."""
    from trainplan.runtime.checkpoint import CheckpointOptions, check_checkpoint_dir

    check_checkpoint_dir(CheckpointOptions(Path(folder), every_steps=checkpoint.every_steps,
                                           every_minutes=checkpoint.every_minutes, keep=checkpoint.keep,
                                           resume=checkpoint.resume), plan)
