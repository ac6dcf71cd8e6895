"""Deterministic, placement-independent parameter initialisation.

A parameter's initial values depend only on ``(seed, fully-qualified name, shape)``: each one
draws from its own ``torch.Generator`` (on the CPU, so every device gets the same numbers) seeded
from a SHA-256 of ``"{seed}:{name}"``. A pipeline stage or a single layer materialised alone on
one rank therefore equals the same parameters of the whole model built in one process, which the
parallel-equals-serial tests rely on.

The rule is chosen from the name and shape alone, so :func:`init_parameter` needs no module:

* a tensor whose last name component is ``bias`` → zeros;
* other tensors of at most one dimension (LayerNorm / RMSNorm / BatchNorm weights) → ones;
* two-dimensional tensors (Linear and Embedding weights) → normal(0, 0.02), the GPT-2 scheme
  (Radford et al. 2019; Brown et al. 2020 §2.1 uses the same);
* convolution kernels (3+ dimensions) → normal(0, sqrt(2 / fan_in)), He et al. 2015 Eq. 10
  with the ReLU gain, fan_in = in_channels * kernel elements.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from trainplan.errors import TrainplanError

InitRule = Literal["zeros", "ones", "normal", "kaiming"]
LINEAR_STD = 0.02  # GPT-2 initialiser range (Radford et al. 2019), dimensionless


def init_rule(name: str, shape: tuple[int, ...] | torch.Size) -> InitRule:
    """The initialisation rule of the parameter ``name`` of the given ``shape``."""
    if name.rsplit(".", 1)[-1] == "bias":
        return "zeros"
    if len(shape) <= 1:
        return "ones"
    if len(shape) == 2:
        return "normal"
    return "kaiming"


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from ``(seed, name)``, equal in every process and Python version."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_values(name: str, shape: tuple[int, ...] | torch.Size, seed: int) -> torch.Tensor:
    """The float32 CPU tensor of initial values of parameter ``name``."""
    rule = init_rule(name, shape)
    if rule == "zeros":
        return torch.zeros(shape)
    if rule == "ones":
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(stable_seed(seed, name))
    if rule == "normal":
        std = LINEAR_STD
    else:
        fan_in = shape[1] * math.prod(shape[2:])
        std = math.sqrt(2.0 / fan_in)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_parameter(name: str, tensor: torch.Tensor, seed: int) -> None:
    """Fill ``tensor`` (the full, unsharded parameter called ``name``) in place.

    Meta tensors hold no values and are left alone, so a plan-time model is never materialised.
    """
    if tensor.is_meta:
        return
    tensor.copy_(init_values(name, tensor.shape, seed))


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int, prefix: str = "") -> None:
    """Initialise every parameter of ``module`` and reset BatchNorm running statistics.

    ``prefix`` is the module's own name inside the full model (e.g. ``"layers.3"``), so a
    sub-module built alone gets the values it has in the full model. Tied parameters are
    initialised once, under the first name that reaches them (see :func:`tied_names`).
    """
    for name, param in module.named_parameters(prefix=prefix):
        init_parameter(name, param, seed)
    for sub in module.modules():
        if isinstance(sub, _NormBase) and sub.track_running_stats and not _has_meta_buffers(sub):
            # Buffers of a meta-built model materialised with to_empty() hold garbage until reset.
            sub.reset_running_stats()


def _has_meta_buffers(module: nn.Module) -> bool:
    return any(b.is_meta for b in module.buffers(recurse=False))


def tied_names(module: nn.Module, prefix: str = "") -> dict[str, str]:
    """Every name of a shared parameter mapped to the name it is initialised under.

    A pipeline stage holding only ``lm_head.weight`` of a model whose head is tied to
    ``wte.weight`` must initialise it as ``wte.weight`` to match the full model.
    """
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in module.named_parameters(prefix=prefix, remove_duplicate=False):
        canonical = first.setdefault(id(param), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def retie(module: nn.Module, aliases: dict[str, str], prefix: str = "") -> None:
    """Make every alias name of ``aliases`` (from :func:`tied_names`) share its canonical parameter.

    ``Module.to_empty`` (and any device move from meta) gives each owner of a shared parameter its
    own new tensor, silently untying embeddings and heads; this restores the sharing. Names are
    relative to the full model, ``prefix`` is ``module``'s own name in it.
    """
    local = {name: param for name, param in module.named_parameters(prefix=prefix, remove_duplicate=False)}
    for alias, canonical in aliases.items():
        if alias not in local or canonical not in local:
            continue  # the partner lives on another pipeline stage
        owner_name, _, attr = alias[len(prefix) + 1 if prefix else 0 :].rpartition(".")
        setattr(module.get_submodule(owner_name), attr, local[canonical])


def materialize(module: nn.Module, device: str | torch.device, seed: int, prefix: str = "") -> nn.Module:
    """Allocate a meta-built ``module`` on ``device`` and initialise it; ties survive.

    Equals building the same module directly on ``device`` and calling :func:`init_parameters`.
    Buffers get the values their builder attached (:func:`set_buffer_values`; e.g. the rotary
    frequencies of Hugging Face models) and BatchNorm statistics are reset; a module with any
    other buffer is refused rather than left holding uninitialised memory.
    """
    unknown = unrestorable_buffers(module, prefix)
    if unknown:
        raise TrainplanError(
            f"cannot materialise a meta-built module with buffers {', '.join(unknown)}: to_empty() "
            "leaves them uninitialised; build the model directly on the device instead"
        )
    aliases = tied_names(module, prefix)
    module.to_empty(device=device)
    retie(module, aliases, prefix)
    init_parameters(module, seed, prefix)
    restore_buffers(module)
    return module


BUFFER_VALUES = "_trainplan_buffer_values"


def set_buffer_values(owner: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Record the values of ``owner``'s own buffers (local names), restored after ``to_empty``.

    Stored on the owning sub-module itself, so every pipeline stage or wrapper that shares the
    sub-module finds them. Buffers are small constants (rotary frequencies, position ids): a
    model's builder computes them on the CPU without allocating its parameters.
    """
    setattr(owner, BUFFER_VALUES, dict(values))


def buffer_values(owner: nn.Module) -> dict[str, torch.Tensor]:
    """The recorded values of ``owner``'s own buffers (empty when none were recorded)."""
    return getattr(owner, BUFFER_VALUES, {})


def unrestorable_buffers(module: nn.Module, prefix: str = "") -> list[str]:
    """Buffers of ``module`` that nothing can give values after ``to_empty``: not norm statistics, not recorded."""
    names = []
    for owner_name, owner in module.named_modules(prefix=prefix):
        if isinstance(owner, _NormBase):
            continue
        known = buffer_values(owner)
        names += [f"{owner_name}.{b}" if owner_name else b
                  for b, _ in owner.named_buffers(recurse=False) if b not in known]
    return names


@torch.no_grad()
def restore_buffers(module: nn.Module) -> int:
    """Copy the recorded values into every buffer that has one (after ``to_empty``); returns how many."""
    count = 0
    for owner in module.modules():
        known = buffer_values(owner)
        for name, buffer in owner.named_buffers(recurse=False):
            if name in known and not buffer.is_meta:
                buffer.copy_(known[name])
                count += 1
    return count
