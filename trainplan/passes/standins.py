"""What meta tensors cannot do by themselves, done the way the real kernels would.

* Scalars: a meta or fake tensor holds no values, so ``bool(t)`` / ``t.item()`` fail. Inside a
  module kept whole (``leaf_modules``) every such read returns zero of the tensor's dtype, so
  data-dependent branches take their zero path and the costs are those of that path.
* Attention: on meta, ``scaled_dot_product_attention`` decomposes to its math path (two ``bmm``
  and a softmax that saves the ``s×s`` probabilities); on CPU it runs
  ``_scaled_dot_product_flash_attention_for_cpu``, which ``torch.utils.flop_counter`` does not
  count at all; on GPUs it runs flash/efficient kernels. We run the flash-for-CPU op on meta
  (it has a meta kernel): it saves what flash kernels save (q, k, v, output, log-sum-exp; no
  ``s×s`` matrix), and we count it with the formulas torch registers for
  ``aten._scaled_dot_product_flash_attention`` and its backward: forward 2 bmm (QKᵀ, PV), backward
  5 bmm including the recomputed scores (Dao et al. 2022, FlashAttention, Alg. 2 and 4). Causal
  masking is not discounted, as in PaLM's 12·L·h·s term (Chowdhery et al. 2022, App. B).
* Dropout: on CPU and meta ``dropout`` multiplies by a mask of the input's dtype; CUDA fuses it
  (``native_dropout``) and saves a one-byte boolean mask, as Korthikanti et al. 2022 (Sec. 4.1)
  count it. We run ``native_dropout`` for ``0 < p < 1`` in training, like ATen's ``dropout`` does
  on GPUs, and return the input itself otherwise, like ATen's ``dropout`` for ``p = 0``.

So the costs describe training on GPUs, where plans run; :func:`resolve_target` and
:class:`GpuKernels` apply these substitutions to graph nodes and to code run whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

aten = torch.ops.aten
SCALAR_READS = (aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default)
FLASH = aten._scaled_dot_product_flash_attention_for_cpu
FLASH_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward
SDPA_TARGETS = (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)
DROPOUT_TARGETS = (aten.dropout.default, torch.dropout)


def _zero(dtype: torch.dtype) -> bool | int | float | complex:
    if dtype == torch.bool:
        return False
    if dtype.is_complex:
        return 0j
    return 0.0 if dtype.is_floating_point else 0


class ScalarStandIn(TorchDispatchMode):
    """Answers every read of a tensor's value with zero of its dtype (meta/fake tensors have none)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in SCALAR_READS:
            return _zero(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _raw(formula: Callable[..., int]) -> Callable[..., int]:
    """The registered formula without its shape wrapper (FlopCounterMode wraps custom ones itself)."""
    return getattr(formula, "__wrapped__", formula)


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the flash-for-CPU attention ops (see module docstring)."""
    mapping = {
        FLASH: _raw(flop_registry[aten._scaled_dot_product_flash_attention]),
        FLASH_BACKWARD: _raw(flop_registry[aten._scaled_dot_product_flash_attention_backward]),
    }
    return FlopCounterMode(display=False, custom_mapping=mapping)


def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` through the flash kernel where it applies, else the math path.

    Dropout is passed to the kernel, as GPU flash kernels take it (they keep an RNG state, not a
    mask; the CPU kernel itself refuses dropout, but its meta kernel does not). Grouped-query
    attention repeats the key/value heads first, as the math path does, so their saved copies are
    counted at the query's head count (an over-estimate of GQA memory).
    """
    if query.dim() == 4 and key.dim() == 4:
        if key.shape[1] != query.shape[1] and query.shape[1] % key.shape[1] == 0:
            repeat = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        try:
            return FLASH(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        except (RuntimeError, NotImplementedError):
            pass  # shapes or mask the kernel refuses: the math path below is counted by its bmm
    return torch._C._nn.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )


def gpu_dropout(x: torch.Tensor, p: float, train: bool) -> torch.Tensor:
    """``aten.dropout`` as it runs on GPUs: fused with a boolean mask for ``0 < p < 1`` in training."""
    if train and 0.0 < p < 1.0 and x.is_floating_point():
        return aten.native_dropout(x, p, train)[0]
    return aten.dropout(x, p, train)


def _functional_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True,
                        inplace: bool = False) -> torch.Tensor:
    return gpu_dropout(input, p, training)


class GpuKernels(TorchFunctionMode):
    """Routes attention and dropout in code we run whole (modules, leaf modules) as on GPUs."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return flash_attention(*args, **kwargs)
        if func is F.dropout:
            return _functional_dropout(*args, **kwargs)
        if func is torch.dropout:
            return gpu_dropout(*args, **kwargs)
        return func(*args, **kwargs)


def resolve_target(target: Any) -> Any:
    """The callable to run for a graph node's target (attention and dropout as on GPUs)."""
    if target in SDPA_TARGETS:
        return flash_attention
    if target in DROPOUT_TARGETS:
        return gpu_dropout
    if target is F.dropout:
        return _functional_dropout
    return target
