"""Tensor parallelism (Megatron-LM style) with DTensor's ``parallelize_module`` and the plan's ``tp_styles``.

``plan.tp_styles`` maps module paths (exact, or globs per dotted atom like ``layers.*.attn.q``) to:

* ``colwise``: ``ColwiseParallel`` — the output features are split over the tp ranks. On the
  output head (a Linear whose ``out_features`` is the task's vocabulary or class count) the
  logits stay split: an lm head yields vocab-sharded logits and the loss is computed under
  ``loss_parallel`` (vocab-parallel cross-entropy, no gathering of the logits); a classifier
  head gathers its (small) logits.
* ``rowwise``: ``RowwiseParallel`` — the input features are split and the partial outputs summed.
* ``vocab``: a vocabulary-parallel embedding (``RowwiseParallel`` on an Embedding: each rank
  holds a slice of the rows, the looked-up vectors are summed across ranks).
* ``replicate``: the parameters are replicated; with sequence parallelism a LayerNorm/RMSNorm
  becomes ``SequenceParallel``.

Sequence parallelism (``plan.sequence_parallel``, Korthikanti et al. 2022 §4.2.2) keeps the
residual stream between blocks split along the sequence (dim 1 of ``(batch, seq, hidden)``):
the first block takes its input replicated and splits it, norms in and after the blocks run on
their slice (``SequenceParallel``), the parent of column-parallel layers (the attention, the MLP)
all-gathers its input and row-parallel layers reduce-scatter their output; the output head
gathers the sequence back.
Every parameterised module in that region must therefore be tensor-parallel or a norm.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from trainplan.ir.plan import TPStyle
from trainplan.ir.spec import TaskSpec
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.structure import is_norm, match_paths

SEQ = Shard(1)  # activations are (batch, seq, hidden)


def resolve_styles(model: nn.Module, styles: dict[str, TPStyle]) -> dict[str, TPStyle]:
    """The plan's styles keyed by concrete module paths of the whole ``model``, checked.

    Raises :class:`PlanExecutionError` for a path that names no module and for a style the
    module's type cannot take.
    """
    modules = dict(model.named_modules())
    out: dict[str, TPStyle] = {}
    for pattern, style in styles.items():
        paths = match_paths(pattern, modules)
        if not paths:
            raise PlanExecutionError(f"tp_styles: {pattern!r} names no module of the model")
        for path in paths:
            _check_style(path, modules[path], style)
            out[path] = style
    return out


def _check_style(path: str, module: nn.Module, style: TPStyle) -> None:
    allowed = {"colwise": (nn.Linear, nn.Embedding), "rowwise": (nn.Linear,), "vocab": (nn.Embedding,)}
    if style in allowed and not isinstance(module, allowed[style]):
        kinds = " or ".join(t.__name__ for t in allowed[style])
        raise PlanExecutionError(
            f"tp_styles: {path!r} is a {type(module).__name__}; style {style!r} applies to {kinds} modules"
        )


def head_features(task: TaskSpec) -> int | None:
    """Output features of the model's head: the vocabulary (lm) or the classes (classification)."""
    return task.vocab if task.kind == "lm" else task.classes


def is_head(module: nn.Module, task: TaskSpec) -> bool:
    return isinstance(module, nn.Linear) and module.out_features == head_features(task)


def sequence_region(model: nn.Module, styles: dict[str, TPStyle], blocks: list[str]) -> tuple[str, list[str]]:
    """The block that enters the sequence-parallel region and the norms inside it.

    The region runs from the first block to the end of the model; every parameterised leaf in it
    must be tensor-parallel or a norm (its gradient would otherwise cover only this rank's tokens).
    """
    if not blocks:
        raise PlanExecutionError("sequence_parallel needs a model made of blocks (ModuleList layers); this model has none")
    names = [name for name, _ in model.named_modules()]
    start = names.index(blocks[0])
    norms: list[str] = []
    for name in names[start:]:
        module = model.get_submodule(name)
        if is_norm(module):
            norms.append(name)
        elif any(True for _ in module.parameters(recurse=False)) and styles.get(name) not in ("colwise", "rowwise"):
            raise PlanExecutionError(
                f"sequence_parallel: {name!r} ({type(module).__name__}) holds parameters inside the sequence-parallel "
                "region but is neither colwise/rowwise nor a norm; give it a tensor-parallel style or set "
                "sequence_parallel: false"
            )
    return blocks[0], norms


def parallel_plan(
    model: nn.Module, styles: dict[str, TPStyle], task: TaskSpec, *, sequence_parallel: bool, blocks: list[str]
) -> dict[str, ParallelStyle]:
    """The ``parallelize_module`` plan of the whole model (paths of the whole model)."""
    if sequence_parallel and not getattr(model, "supports_sequence_parallel", True):
        raise PlanExecutionError(
            f"sequence_parallel: {type(model).__name__} does not support it (its layers pass the hidden states to "
            "their attention by keyword, which the sequence gather cannot see); set sequence_parallel: false"
        )
    plan: dict[str, ParallelStyle] = {}
    for path, style in styles.items():
        module = model.get_submodule(path)
        if style == "colwise":
            plan[path] = _colwise(module, task, sequence_parallel)
        elif style == "rowwise":
            plan[path] = RowwiseParallel(output_layouts=SEQ if sequence_parallel else Replicate())
        elif style == "vocab":
            plan[path] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if sequence_parallel:
        plan.update(_sequence_parallel_plan(model, styles, task, blocks))
    return plan


def _sequence_parallel_plan(
    model: nn.Module, styles: dict[str, TPStyle], task: TaskSpec, blocks: list[str]
) -> dict[str, ParallelStyle]:
    """Entry split, norms on sequence slices, and a gather in front of every column-parallel sub-layer.

    Between modules the tensors are local: the residual stream is this rank's slice of the
    sequence. A column-parallel layer's *parent* (the attention, the MLP) gathers the whole
    sequence on entry, because such modules read the sequence length from their input's shape.
    """
    entry, norms = sequence_region(model, styles, blocks)
    gather = PrepareModuleInput(input_layouts=(SEQ,), desired_input_layouts=(Replicate(),), use_local_output=True)
    plan: dict[str, ParallelStyle] = {
        entry: PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(SEQ,), use_local_output=True)
    }
    plan.update({norm: SequenceParallel(use_local_output=True) for norm in norms})
    for path, style in styles.items():
        if style != "colwise" or is_head(model.get_submodule(path), task):
            continue
        parent = path.rpartition(".")[0]
        if not parent or parent in blocks:
            raise PlanExecutionError(
                f"sequence_parallel: column-parallel {path!r} must sit in a sub-module of its block (an attention "
                "or MLP module) that can gather the sequence; this layout cannot use sequence parallelism"
            )
        plan[parent] = gather
    return plan


def _colwise(module: nn.Module, task: TaskSpec, sequence_parallel: bool) -> ColwiseParallel:
    if not is_head(module, task):
        return ColwiseParallel()  # with sequence parallelism its parent gathers the sequence first
    input_layouts = SEQ if sequence_parallel else Replicate()
    if task.kind == "lm":
        return ColwiseParallel(input_layouts=input_layouts, output_layouts=Shard(-1), use_local_output=False)
    return ColwiseParallel(input_layouts=input_layouts, output_layouts=Replicate())


def uses_loss_parallel(model: nn.Module, styles: dict[str, TPStyle], task: TaskSpec) -> bool:
    """True when the lm head is column-parallel, so the loss must run under ``loss_parallel``."""
    return task.kind == "lm" and any(
        style == "colwise" and is_head(model.get_submodule(path), task) for path, style in styles.items()
    )


def apply_tensor_parallel(module: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> int:
    """Parallelise the entries of ``plan`` that ``module`` (a stage, or the whole model) holds."""
    local = {path: style for path, style in plan.items() if _holds(module, path)}
    if local:
        parallelize_module(module, tp_mesh, local)
    return len(local)


def _holds(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def loss_context(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """``loss_parallel()`` when the logits are vocab-sharded, else nothing."""
    return loss_parallel() if enabled else contextlib.nullcontext()

