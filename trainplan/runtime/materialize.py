"""Build the model on the meta device and give this rank real memory for only what it holds.

The whole model is built on ``meta`` (no memory), cut to this rank's pipeline stages, sharded for
tensor parallelism and FSDP while still on meta, and only then allocated: every parameter this
rank holds — a whole tensor, or the local shard of a DTensor — gets exactly the values that
:func:`trainplan.models.init.init_values` gives the same parameter of the whole single-process
model, so a parallel run starts from the serial run's weights.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.nn.modules.batchnorm import _NormBase

from trainplan.ir.spec import Spec
from trainplan.models import BuiltModel, build_model, tied_names
from trainplan.models.init import init_values, restore_buffers, unrestorable_buffers
from trainplan.runtime.errors import PlanExecutionError


def build_meta_model(spec: Spec) -> BuiltModel:
    """The spec's whole model on the meta device (no parameter memory), task resolved."""
    return build_model(spec.model, spec.task, device="meta")


def model_aliases(module: nn.Module) -> dict[str, str]:
    """Tied parameter names of the whole model mapped to the name they are initialised under."""
    return tied_names(module)


def local_shard(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (the unsharded values) that this rank holds of ``param``.

    A plain tensor holds all of it; a DTensor (tensor parallel, FSDP, or both) holds the block
    its placements give this rank, computed locally without communication. A ``_StridedShard``
    (the ``qkv`` tensor-parallel style: this rank's columns of q, of k and of v) is not one block:
    its elements are picked per dimension as DTensor itself splits them.
    """
    if not isinstance(param, DTensor):
        return full
    if any(isinstance(p, _StridedShard) for p in param.placements):
        return _strided_local(full, param)
    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    index = tuple(slice(start, start + size) for start, size in zip(offset, shape))
    return full[index]


def _strided_local(full: torch.Tensor, param: DTensor) -> torch.Tensor:
    """This rank's elements of ``full`` under placements that include ``_StridedShard``.

    Each tensor dimension's global indices are split mesh dimension by mesh dimension, left to
    right, with the placement's own ``_split_tensor`` (the split ``distribute_tensor`` makes), on
    a 1-D index vector; the local tensor is ``full`` at those indices.
    """
    mesh = param.device_mesh
    coordinate = mesh.get_coordinate()
    indices = [torch.arange(n) for n in full.shape]
    for mesh_dim, placement in enumerate(param.placements):
        if not isinstance(placement, Shard | _StridedShard):
            continue
        dim = placement.dim % full.ndim
        along = (_StridedShard(0, split_factor=placement.split_factor) if isinstance(placement, _StridedShard)
                 else Shard(0))
        pieces, _ = along._split_tensor(indices[dim], mesh.size(mesh_dim), with_padding=False)
        indices[dim] = pieces[coordinate[mesh_dim]]
    out = full
    for dim, index in enumerate(indices):
        out = out.index_select(dim, index)
    return out


def _local_tensor(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _named_parameters(modules: list[nn.Module]) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters of every local stage module, once each, under their names in the whole model."""
    seen: set[int] = set()
    for module in modules:
        for name, param in module.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                yield name, param


def retie_local(module: nn.Module, aliases: dict[str, str]) -> int:
    """Make each alias in ``module`` share its canonical parameter again; returns how many were re-tied.

    Device moves (``to_empty``) and ``parallelize_module`` replace each owner's parameter separately,
    which silently unties embeddings and heads. Pairs already shared (FSDP keeps them) and pairs
    whose partner lives on another pipeline stage are left alone. Sharded partners must have the
    same placements, else the values could not be one tensor.
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    count = 0
    for alias, canonical in aliases.items():
        if alias not in params or canonical not in params or params[alias] is params[canonical]:
            continue
        shared, other = params[canonical], params[alias]
        if isinstance(shared, DTensor) or isinstance(other, DTensor):
            if getattr(shared, "placements", None) != getattr(other, "placements", None):
                raise PlanExecutionError(
                    f"tied parameters {canonical!r} and {alias!r} are sharded differently "
                    f"({getattr(shared, 'placements', 'whole')} vs {getattr(other, 'placements', 'whole')}); "
                    "give both modules compatible tensor-parallel styles (vocab embedding + colwise head)"
                )
        owner, _, attr = alias.rpartition(".")
        setattr(module.get_submodule(owner), attr, shared)
        count += 1
    return count


def check_buffers(module: nn.Module) -> None:
    """Refuse modules with buffers that nothing can restore after ``to_empty``.

    Norm statistics are reset; buffers whose values the model's builder recorded
    (:func:`trainplan.models.init.set_buffer_values`, e.g. Hugging Face rotary frequencies and
    position ids) are copied back; any other buffer would hold uninitialised memory.
    """
    names = unrestorable_buffers(module)
    if names:
        raise PlanExecutionError(
            f"the runtime builds models on the meta device and cannot restore the buffers {', '.join(names)} "
            "after allocating them; use a model whose constant tensors are computed in forward "
            "(like the catalogue's llama rotary angles) or record their values with "
            "trainplan.models.init.set_buffer_values"
        )


@torch.no_grad()
def materialize_local(
    modules: list[nn.Module], *, device: torch.device, seed: int, aliases: dict[str, str]
) -> None:
    """Allocate the meta-built ``modules`` (this rank's stages) on ``device`` and initialise them.

    ``aliases`` (from :func:`model_aliases` on the whole model) maps a tied name such as
    ``lm_head.weight`` to the name it is initialised under (``wte.weight``), so a stage holding
    only the head starts with the embedding's values. Names inside each module must be the names
    in the whole model, which the stage builder and the parallel wrappers preserve.
    """
    for module in modules:
        check_buffers(module)
        local_aliases = tied_names(module)
        module.to_empty(device=device)
        retie_local(module, local_aliases)  # to_empty gives each owner of a shared parameter its own tensor
    for name, param in _named_parameters(modules):
        full = init_values(aliases.get(name, name), tuple(param.shape), seed)
        _local_tensor(param).copy_(local_shard(full, param))
    for module in modules:
        restore_buffers(module)
        for sub in module.modules():
            if isinstance(sub, _NormBase) and sub.track_running_stats:
                sub.reset_running_stats()
