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
* ``qkv``: column-parallel for a fused ``[q | k | v]`` projection (transformers' GPT-2 ``c_attn``):
  a plain column split would give rank 0 all of q and half of k, so each of the three blocks is
  split over the ranks instead — rank ``r`` holds its heads' columns of q, of k and of v, which is
  DTensor's ``_StridedShard(dim, split_factor=3)`` (the parameter's global value is unchanged, so
  initialisation, gathering and checkpoints see the single-process tensor). The parent attention
  splits this rank's output into its three parts (``split_size``, divided by the tp degree).

``colwise``, ``rowwise`` and ``qkv`` also take transformers' ``Conv1D`` (GPT-2), ``y = x @ W + b``
with ``W`` of shape ``(in, out)``, the transpose of a Linear's: its output features are dim 1 of
the weight (dim 0 of the bias), its input features dim 0 (Shoeybi et al. 2019, Sec. 3, with the
weight transposed).

Sequence parallelism (``plan.sequence_parallel``, Korthikanti et al. 2022 §4.2.2) keeps the
residual stream between blocks split along the sequence (dim 1 of ``(batch, seq, hidden)``):
the first block takes its input replicated and splits it, norms in and after the blocks run on
their slice (``SequenceParallel``), the parent of column-parallel layers (the attention, the MLP)
all-gathers its input and row-parallel layers reduce-scatter their output; the output head
gathers the sequence back.
Every parameterised module in that region must therefore be tensor-parallel or a norm.

Megatron's ``f`` operator (identity forward, all-reduce of the input gradient backward) sits once
in front of an attention's q/k/v or a gated MLP's gate/up projections, not once per projection.
DTensor's ``ColwiseParallel`` on a plain tensor input makes its own replicated DTensor, whose
backward all-reduces that projection's input gradient alone: three all-reduces for q, k, v. So the
parent of two or more column-parallel layers (and, under sequence parallelism, of any) hands them
one DTensor (:class:`SharedInput`, the parent's own code still sees a plain tensor); their input
gradients add up as partial sums and are reduced once — an all-reduce, or under sequence
parallelism one reduce-scatter.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.placement_types import Placement, _StridedShard
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
QKV_PARTS = 3  # a fused projection's output blocks: q, k, v
COLUMN_STYLES = ("colwise", "qkv")  # styles whose outputs are split over the tp ranks


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's layers): ``y = x @ weight + bias``, weight ``(nx, nf)`` = (in, out).

    Recognised by its name and shape so that the runtime does not import transformers."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and weight is not None
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


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


_ALLOWED = {"colwise": ("Linear", "Embedding", "Conv1D"), "rowwise": ("Linear", "Conv1D"), "vocab": ("Embedding",),
            "qkv": ("Conv1D",)}


def _kind(module: nn.Module) -> str:
    if is_conv1d(module):
        return "Conv1D"
    for cls in (nn.Linear, nn.Embedding):
        if isinstance(module, cls):
            return cls.__name__
    return type(module).__name__


def _check_style(path: str, module: nn.Module, style: TPStyle) -> None:
    allowed = _ALLOWED.get(style)
    if allowed is not None and _kind(module) not in allowed:
        kinds = " or ".join(allowed)
        raise PlanExecutionError(
            f"tp_styles: {path!r} is a {type(module).__name__}; style {style!r} applies to {kinds} modules"
        )
    if style == "qkv" and module.nf % QKV_PARTS:
        raise PlanExecutionError(f"tp_styles: {path!r} has {module.nf} output features, not {QKV_PARTS} equal "
                                 "blocks q, k, v; style 'qkv' needs a fused q/k/v projection")


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
        elif any(True for _ in module.parameters(recurse=False)) and styles.get(name) not in (*COLUMN_STYLES, "rowwise"):
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
        if style == "colwise" and is_conv1d(module):
            plan[path] = Conv1DColwise()
        elif style == "colwise":
            plan[path] = _colwise(module, task, sequence_parallel)
        elif style == "qkv":
            plan[path] = Conv1DColwise(parts=QKV_PARTS)
            parent = path.rpartition(".")[0]
            plan[parent] = LocalSplitSize(_fused_split_width(model, parent, path, module))
        elif style == "rowwise":
            output = SEQ if sequence_parallel else Replicate()
            plan[path] = Conv1DRowwise(output_layouts=output) if is_conv1d(module) else RowwiseParallel(output_layouts=output)
        elif style == "vocab":
            plan[path] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if sequence_parallel:
        plan.update(_sequence_parallel_plan(model, styles, task, blocks))
    else:
        for parent, children in _column_parents(model, styles, task).items():
            if len(children) > 1 and parent and parent not in blocks:  # a block's residual stream stays local
                plan.setdefault(parent, SharedInput(Replicate(), children))
    return plan


def _column_parents(model: nn.Module, styles: dict[str, TPStyle], task: TaskSpec) -> dict[str, list[str]]:
    """Parents (``''`` for the root) of column-parallel layers other than the head, with those layers'
    names relative to the parent."""
    children: dict[str, list[str]] = {}
    for path, style in styles.items():
        if style in COLUMN_STYLES and not is_head(model.get_submodule(path), task):
            parent, _, name = path.rpartition(".")
            children.setdefault(parent, []).append(name)
    return children


class SharedInput(ParallelStyle):
    """One DTensor (``layout`` on entry, replicated) for all the column-parallel layers ``children`` of
    a module read from its input, so that their input gradients add up as partial sums and are
    reduced once (Megatron-LM's ``f``, Shoeybi et al. 2019, Sec. 3, Fig. 3): one all-reduce — or,
    from a sequence-split input (Korthikanti et al. 2022, Sec. 4.2.2), one all-gather forward and
    one reduce-scatter backward — in place of one all-reduce per projection.

    The module itself keeps a plain tensor: its input as it was, or from a sequence-split input the
    gathered sequence (``to_local`` of the shared DTensor), so whatever else its code does with it
    (shapes, a residual sum inside) runs on a local tensor as before; a child called with exactly
    that tensor gets the shared DTensor instead (a forward pre-hook that runs before the child's
    ``ColwiseParallel`` one). The input is the first positional argument, else the
    ``hidden_states`` keyword (transformers' attention); a call with neither is left as it is (each
    projection then reduces its own).
    """

    def __init__(self, layout: Placement, children: list[str]) -> None:
        super().__init__()
        self.layout, self.children = layout, list(children)
        self._current: tuple[torch.Tensor, DTensor] | None = None  # (the tensor the module sees, its DTensor)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.register_forward_pre_hook(partial(self._enter, device_mesh), with_kwargs=True)
        module.register_forward_hook(self._leave)
        for name in self.children:
            module.get_submodule(name).register_forward_pre_hook(self._child, prepend=True)
        return module

    def _share(self, mesh: DeviceMesh, x: object) -> object:
        """The tensor the module sees in place of ``x``; remembers the DTensor its children get."""
        if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
            return x
        shared = DTensor.from_local(x, mesh, (self.layout,), run_check=False)
        if shared.placements != (Replicate(),):
            shared = shared.redistribute(mesh, (Replicate(),))
            x = shared.to_local()
        self._current = (x, shared)
        return x

    def _enter(self, mesh: DeviceMesh, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            return (self._share(mesh, args[0]), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": self._share(mesh, kwargs["hidden_states"])}
        return None

    def _leave(self, module: nn.Module, args: tuple, output: object) -> None:
        self._current = None

    def _child(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._current is not None and args and args[0] is self._current[0]:
            return (self._current[1], *args[1:])
        return None


def _sequence_parallel_plan(
    model: nn.Module, styles: dict[str, TPStyle], task: TaskSpec, blocks: list[str]
) -> dict[str, ParallelStyle]:
    """Entry split, norms on sequence slices, and a gather in front of every column-parallel sub-layer.

    Between modules the tensors are local: the residual stream is this rank's slice of the
    sequence. A column-parallel layer's *parent* (the attention, the MLP) gathers the whole
    sequence on entry, because such modules read the sequence length from their input's shape.
    """
    entry, norms = sequence_region(model, styles, blocks)
    plan: dict[str, ParallelStyle] = {
        entry: PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(SEQ,), use_local_output=True)
    }
    plan.update({norm: SequenceParallel(use_local_output=True) for norm in norms})
    for parent, children in _column_parents(model, styles, task).items():
        if not parent or parent in blocks:
            child = f"{parent}.{children[0]}" if parent else children[0]
            raise PlanExecutionError(
                f"sequence_parallel: column-parallel {child!r} must sit in a sub-module of its block (an attention "
                "or MLP module) that can gather the sequence; this layout cannot use sequence parallelism"
            )
        plan[parent] = SharedInput(SEQ, children)
    return plan


def _fused_split_width(model: nn.Module, parent: str, path: str, module: nn.Module) -> int:
    """The width at which ``path``'s parent splits the fused q/k/v output (its ``split_size``), checked.

    transformers' GPT-2 attention runs ``c_attn(x).split(self.split_size, dim=2)`` with
    ``split_size`` = hidden size; on a rank the output is 1/t as wide, so the split must be too.
    """
    owner = model.get_submodule(parent) if parent else model
    width = getattr(owner, "split_size", None)
    if width is None or width * QKV_PARTS != module.nf:
        raise PlanExecutionError(
            f"tp_styles: {path!r} is 'qkv', but its parent {parent!r} ({type(owner).__name__}) does not split the "
            f"fused output into {QKV_PARTS} parts of {module.nf // QKV_PARTS} by a 'split_size' attribute "
            "(transformers' GPT-2 attention does); the per-rank split could not be adjusted"
        )
    return width


class Conv1DColwise(ColwiseParallel):
    """Column parallelism for transformers' ``Conv1D``: weight ``Shard(1)``, bias ``Shard(0)``.

    ``parts > 1``: the output features are ``parts`` equal blocks (a fused ``[q | k | v]``); rank
    ``r`` holds the ``r``-th ``1/t`` of every block of the weight, ``_StridedShard(1,
    split_factor=parts)``, so its local output is ``[q_r | k_r | v_r]`` — its own heads of each
    (Shoeybi et al. 2019, Sec. 3: attention heads split over the ranks). The bias (``3h``
    elements) stays whole on every rank and the forward takes this rank's part of it. It is not
    strided like the weight because FSDP (ZeRO 2/3, ``replicate``) shards dim 0 of every tensor,
    and a dim-0 shard of a strided dim-0 shard is a layout DTensor's placements do not describe
    (gathered, such a bias came out permuted).
    """

    def __init__(self, parts: int = 1) -> None:
        super().__init__()
        self.parts = parts

    def _placement(self, dim: int) -> Placement:
        return Shard(dim) if self.parts == 1 else _StridedShard(dim, split_factor=self.parts)

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for pname, param in list(module.named_parameters(recurse=False)):
            if pname == "weight":  # (in, out)
                placement = self._placement(1)
            else:  # bias (out,)
                placement = Shard(0) if self.parts == 1 else Replicate()
            shard = distribute_tensor(param, mesh, [placement], src_data_rank=self.src_data_rank)
            module.register_parameter(pname, nn.Parameter(shard, requires_grad=param.requires_grad))

    def _output(self, mod: nn.Module, outputs: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        wanted = (self._placement(outputs.ndim - 1),)
        if outputs.placements != wanted:  # the output features (last dim) as the weight's columns
            outputs = outputs.redistribute(placements=wanted)
        return outputs.to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if self.parts > 1 and module.bias is not None:
            module.forward = partial(self._forward_with_bias_part, module)
        return distribute_module(
            module, device_mesh, self._partition,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts), self._output,
        )

    def _forward_with_bias_part(self, module: nn.Module, x: DTensor) -> DTensor:
        """``Conv1D.forward`` (``addmm(bias, x, weight)``, transformers.pytorch_utils) with this rank's
        part of the whole bias taken by an explicit redistribution: its backward gathers the bias
        gradient whole, like the parameter (left to ``addmm``, the redistribution would leave this
        rank's part as the gradient of a whole parameter)."""
        bias = module.bias.redistribute(placements=[self._placement(0)])
        out = torch.addmm(bias, x.view(-1, x.size(-1)), module.weight)
        return out.view(*x.shape[:-1], module.nf)


class Conv1DRowwise(RowwiseParallel):
    """Row parallelism for transformers' ``Conv1D``: weight ``Shard(0)`` (its input features), bias
    replicated (added once after the partial sums are reduced), input split on its last dim."""

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for pname, param in list(module.named_parameters(recurse=False)):
            placement = Shard(0) if pname == "weight" else Replicate()
            shard = distribute_tensor(param, mesh, [placement], src_data_rank=self.src_data_rank)
            module.register_parameter(pname, nn.Parameter(shard, requires_grad=param.requires_grad))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module, device_mesh, self._partition,
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class LocalSplitSize(ParallelStyle):
    """The module that splits a ``qkv`` projection's output (its ``split_size``, GPT-2's attention)
    splits this rank's ``1/t`` as wide output: ``split_size`` becomes ``width / t``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        t = device_mesh.size()
        head_dim = getattr(module, "head_dim", 1)
        if self.width % (t * head_dim):
            raise PlanExecutionError(
                f"tensor parallelism over {t} ranks cannot split {type(module).__name__}'s fused q/k/v width "
                f"{self.width} into whole heads of {head_dim}"
            )
        module.split_size = self.width // t
        return module


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

