"""The device mesh of a plan: one DeviceMesh with dims ``(pp, dp, tp)``, TP innermost.

Rank ``r`` sits at the mesh coordinate ``(pp, dp, tp)`` with ``r = (pp * dp_size + dp) * tp_size
+ tp`` (:meth:`trainplan.ir.plan.Mesh.rank`), so a tensor-parallel group is ``tp`` consecutive
ranks and stays inside a node. Every process group of the mesh is created with the plan's
collective timeout: a peer that dies or stalls turns into an error after that many seconds,
never into a hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainplan.ir.plan import Mesh
from trainplan.runtime.errors import WorldSizeError

MESH_DIMS = ("pp", "dp", "tp")


def check_world_size(mesh: Mesh, world_size: int, source: str, servers: int = 0) -> None:
    """Refuse to start when ``world_size`` processes were launched for a plan that needs another number.

    ``source`` says who launched them (``"--nproc"``, ``"torchrun (WORLD_SIZE)"``) for the message;
    ``servers`` counts the plan's dedicated parameter-server ranks, which come after the mesh's.
    """
    need = mesh.world_size + servers
    if need != world_size:
        what = f"the plan's mesh pp={mesh.pp} x dp={mesh.dp} x tp={mesh.tp}"
        if servers:
            what += f" ({mesh.world_size} workers) + {servers} dedicated parameter servers"
        raise WorldSizeError(
            f"{what} needs {need} processes, but {source} gives {world_size}; launch {need} processes, or re-plan "
            f"the spec for {world_size} devices (cluster.devices_per_node x nodes = {world_size})"
        )


def coordinates(mesh: Mesh, rank: int) -> tuple[int, int, int]:
    """The ``(pp, dp, tp)`` coordinate of global ``rank``: the inverse of ``Mesh.rank``."""
    if not 0 <= rank < mesh.world_size:
        raise ValueError(f"rank {rank} is outside a mesh of {mesh.world_size} ranks")
    pp, rest = divmod(rank, mesh.dp * mesh.tp)
    dp, tp = divmod(rest, mesh.tp)
    return pp, dp, tp


def group_options(backend: str, timeout_s: float) -> object:
    """Backend options carrying the collective timeout, for DeviceMesh's per-dimension groups.

    ``init_device_mesh`` creates its sub-groups with the backend's default timeout (30 min on gloo)
    unless options say otherwise; these do.
    """
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
    else:
        options = dist.ProcessGroupGloo._Options()
    options._timeout = timedelta(seconds=timeout_s)
    return options


@dataclass(frozen=True)
class RankMesh:
    """This process's place in the plan's mesh and the DeviceMesh built on it."""

    shape: Mesh
    rank: int
    device_mesh: DeviceMesh
    device: torch.device

    @property
    def in_mesh(self) -> bool:
        """False on a dedicated parameter-server rank (a rank after the mesh's)."""
        return self.rank < self.shape.world_size

    @property
    def pp_rank(self) -> int:
        return coordinates(self.shape, self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return coordinates(self.shape, self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return coordinates(self.shape, self.rank)[2]

    def group(self, dim: str) -> dist.ProcessGroup:
        """The process group of this rank along mesh dimension ``dim`` (``pp``, ``dp`` or ``tp``)."""
        return self.device_mesh.get_group(dim)

    def sub(self, dim: str) -> DeviceMesh:
        """The 1-D sub-mesh along ``dim`` through this rank."""
        return self.device_mesh[dim]


def build_mesh(shape: Mesh, *, device: torch.device, timeout_s: float, servers: int = 0) -> RankMesh:
    """Create the ``(pp, dp, tp)`` DeviceMesh; the default process group must already exist.

    Checks the world size against the mesh first, so a wrong launch fails before any group is made.
    With ``servers`` dedicated parameter-server ranks (after the mesh's) those ranks take part in
    creating the mesh's groups (every rank must) but are not in it: their ``RankMesh.in_mesh`` is false.
    """
    check_world_size(shape, dist.get_world_size(), "the process group", servers)
    backend = dist.get_backend()
    options = group_options(backend, timeout_s)
    device_mesh = init_device_mesh(
        device.type,
        (shape.pp, shape.dp, shape.tp),
        mesh_dim_names=MESH_DIMS,
        backend_override={dim: (backend, options) for dim in MESH_DIMS},
    )
    return RankMesh(shape, dist.get_rank(), device_mesh, device)


def new_group_with_timeout(ranks: list[int], timeout_s: float) -> dist.ProcessGroup | None:
    """``dist.new_group(ranks)`` with the plan's timeout (every rank must call it, in the same order)."""
    return dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
