"""The model as the search sees it: a chain of pipeline-cuttable units with per-sample costs.

Built once per spec from the traced :class:`~trainplan.ir.graph.OpGraph`; everything the
search needs per layout is derived from it with the cost functions, so the search itself never
touches torch.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Literal

from trainplan.ir.facts import TransformerFacts
from trainplan.ir.graph import OpGraph, OpNode

UnitKind = Literal["embedding", "block", "head", "other"]


@dataclass(frozen=True, slots=True)
class UnitCost:
    """One unit, per sample: FLOPs, parameters (count), activation and cut bytes."""

    name: str
    kind: UnitKind
    modules: tuple[str, ...]
    params: float
    flops_fwd: float
    flops_bwd: float
    activation_bytes: float  # saved for backward, per sample, in the compute dtype
    output_bytes: float  # crosses a cut right after this unit, per sample
    tp_replicated: float = 0.0  # of ``params``, those tensor parallelism leaves whole on every rank (norms, row-parallel biases)
    kernels: float = 0.0  # forward ops that launch device work, per micro-batch (:func:`unit_kernels`); 0: not traced
    # Traced saved bytes (per sample, compute dtype; all 0 on the closed-form path, which then uses the
    # Korthikanti et al. formulas), see :func:`traced_activations`:
    act_tp_sharded: float = 0.0  # of ``activation_bytes``, those tensor parallelism divides by ``t``
    act_selective: float = 0.0  # kept under ``recompute: selective`` (the runtime's policy)
    act_selective_tp_sharded: float = 0.0  # of ``act_selective``, those divided by ``t``
    act_full: float = 0.0  # kept under ``recompute: full``: the unit's inputs


@dataclass(frozen=True, slots=True)
class ModelCosts:
    units: tuple[UnitCost, ...]
    facts: TransformerFacts | None
    params: float  # whole model, tied parameters once
    # (unit, owner unit, parameters): unit reads parameters owned by another (a tied LM head reads
    # the embedding); a stage holding the unit without its owner keeps its own copy.
    shared: tuple[tuple[int, int, float], ...] = ()
    # Module paths of layers that normalise over the batch (BatchNorm): micro-batching changes their result.
    batch_statistics: tuple[str, ...] = ()
    # Bytes per sample the loss keeps for backward, outside the traced model (:func:`loss_saved_bytes`); 0: closed form.
    loss_bytes: float = 0.0

    @property
    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward, no recompute) of one sample."""
        return sum(u.flops_fwd + u.flops_bwd for u in self.units)

    @property
    def blocks(self) -> int:
        return sum(1 for u in self.units if u.kind == "block")

    def index_of(self, kind: UnitKind) -> list[int]:
        return [i for i, u in enumerate(self.units) if u.kind == kind]


def model_costs_from_facts(facts: TransformerFacts, element_bytes: int = 2) -> ModelCosts:
    """The closed-form chain embedding → ``layers`` blocks → head of a GPT-style transformer.

    Parameters per layer and embeddings: Megatron-LM Eq. 2 (Narayanan et al. 2021); FLOPs per
    sample: the layer and logit terms of Eq. 3 (forward; backward twice the forward). Used to
    validate the planner against published tables without tracing, and in property tests.
    """
    from trainplan.planner import cost  # the cost package imports nothing of this module

    h, s, v = facts.hidden, facts.seq_len, facts.vocab
    layer_params = cost.transformer_layer_params(facts)
    layer_f = cost.transformer_layer_flops(facts, 1)
    head_f = cost.lm_head_flops(facts, 1)
    cut = float(s * h * element_bytes)
    embed_params = v * h + (s * h if facts.learned_positions else 0)
    head_params = 2 * h + (0 if facts.tied_embeddings else v * h)
    units = [UnitCost("embedding", "embedding", ("wte", "wpe"), embed_params, 0.0, 0.0, 0.0, cut)]
    units += [
        UnitCost(f"layers.{i}", "block", (f"layers.{i}",), layer_params, layer_f, 2 * layer_f, 0.0, cut)
        for i in range(facts.layers)
    ]
    units.append(UnitCost("head", "head", ("ln_f", "lm_head"), head_params, head_f, 2 * head_f, 0.0, 0.0))
    total = embed_params + facts.layers * layer_params + head_params
    shared = ((len(units) - 1, 0, float(v * h)),) if facts.tied_embeddings else ()
    return ModelCosts(tuple(units), facts, total, shared)


def model_costs_from_graph(graph: OpGraph) -> ModelCosts:
    """The unit chain of a traced graph (per-sample costs as measured by the front end)."""
    index = {u.name: i for i, u in enumerate(graph.units)}
    replicated = tp_replicated_params(graph) if graph.facts is not None else [0] * len(graph.units)
    acts = traced_activations(graph)
    units = tuple(
        UnitCost(u.name, u.kind, u.modules, float(u.params), u.flops_fwd, u.flops_bwd, a.none,
                 float(u.output_bytes), float(r), float(unit_kernels(graph.unit_nodes(u))), a.none_sharded,
                 a.selective, a.selective_sharded, a.full)
        for u, r, a in zip(graph.units, replicated, acts)
    )
    shared = []
    for names, holders in zip(graph.tied, graph.tied_units):
        owner = index[holders[0]]
        count = float(_param_count(graph, names))
        shared += [(index[h], owner, count) for h in holders[1:]]
    batch_norms = tuple(path for path, cls in graph.module_classes if BATCH_STATISTICS.search(cls))
    return ModelCosts(units, graph.facts, float(graph.params), tuple(sorted(shared)), batch_norms,
                      loss_saved_bytes(graph))


# Operators that only describe a tensor differently (views: same storage, new shape or strides),
# read metadata, or index a tuple: eager PyTorch launches no device kernel for them (PyTorch
# documentation, "Tensor Views"). Names as the front end records them without namespace or
# overload: aten ops (``aten.view.default`` → ``view``), tensor methods, functions, module classes.
NO_KERNEL_OPS = frozenset({
    "view", "_unsafe_view", "view_as", "reshape", "flatten", "unflatten", "transpose", "t", "permute", "movedim",
    "expand", "expand_as", "unsqueeze", "squeeze", "slice", "select", "narrow", "split", "split_with_sizes",
    "chunk", "unbind", "as_strided", "alias", "detach", "getitem", "getattr", "size", "sym_size", "dim", "numel",
    "Flatten", "Unflatten", "Identity",
})


def _op_name(node: OpNode) -> str:
    """``aten.view.default`` → ``view``; ``torch.nn.functional.gelu`` → ``gelu``; methods and module classes as they are."""
    target = node.target
    if target.startswith("aten."):
        return target.split(".")[1]
    return target.rsplit(".", 1)[-1]


def launches_kernel(node: OpNode) -> bool:
    """Whether ``node`` launches device work when run eagerly: everything but :data:`NO_KERNEL_OPS`.

    An op that may or may not copy (``reshape`` of a non-contiguous tensor) is taken as a view; a
    module traced as one opaque node counts as one launch (its inside is not seen).
    """
    return _op_name(node) not in NO_KERNEL_OPS


def unit_kernels(nodes: tuple[OpNode, ...] | list[OpNode]) -> int:
    """Forward kernel launches of a run of traced nodes: one per node that :func:`launches_kernel`.

    Eager PyTorch runs each aten operator as (at least) one kernel, so the traced graph's op count
    is the forward's kernel count; the cost model charges each launch ``device.kernel_launch``
    (:func:`trainplan.planner.cost.kernel_overhead_s`) and the backward twice as many (input and
    weight gradients), as ``trainplan calibrate`` measures it (a linear layer: 1 + 2 kernels).
    """
    return sum(1 for n in nodes if launches_kernel(n))


# Class names of layers whose training-mode output depends on the other samples of the batch.
BATCH_STATISTICS = re.compile(r"BatchNorm")


def _param_count(graph: OpGraph, names: tuple[str, ...]) -> int:
    """Elements of a tied parameter group, from the node that owns it."""
    for node in graph.nodes:
        if node.params and any(n in node.param_names for n in names):
            return node.params
    return 0


def tp_sharded(name: str, styles: dict[str, str]) -> bool:
    """Whether tensor parallelism shards parameter ``name`` under ``styles`` (module patterns, one glob per
    dotted atom, as ``parallelize_module`` matches them): column-parallel weights and biases, row-parallel
    and vocabulary-parallel weights; a row-parallel layer's bias is added after the reduction, so it
    is replicated, as is every parameter of an unlisted module (Shoeybi et al. 2019, Sec. 3)."""
    from fnmatch import fnmatch

    module, _, leaf = name.rpartition(".")
    atoms = module.split(".")
    for pattern, style in styles.items():
        parts = pattern.split(".")
        if len(parts) == len(atoms) and all(fnmatch(a, p) for a, p in zip(atoms, parts)):
            return style in ("colwise", "vocab") or (style == "rowwise" and leaf != "bias")
    return False


def tp_replicated_params(graph: OpGraph) -> list[int]:
    """Per unit, the elements of the parameters it owns (first reads) that the catalogue's
    tensor-parallel styles leave whole on every rank."""
    from trainplan.planner.build_plan import CATALOGUE_TP_STYLES  # the styles the plan will carry

    styles = dict(CATALOGUE_TP_STYLES)
    names = {m for u in graph.units for m in u.modules}
    if "lm_head" not in names and ("head.lm_head" in names or "head" in names):  # bert's MLM head: the
        styles["head.lm_head"] = styles.pop("lm_head")  # same condition as build_plan.tp_styles (unit "head")
    numel = {p.name: p.numel for p in graph.parameters}
    seen: set[str] = set()
    out = []
    for unit in graph.units:
        count = 0
        for node in graph.nodes[unit.first:unit.stop]:
            for name in node.param_names:
                if name in seen or name not in numel:
                    continue
                seen.add(name)
                count += 0 if tp_sharded(name, styles) else numel[name]
        out.append(count)
    return out


# Trace-level operators whose outputs ``recompute: selective`` keeps (the runtime's ``SAVED_OPS``,
# trainplan/runtime/recompute.py, as the front end names them before dispatch: ``linear`` runs
# as ``mm``/``addmm``, ``layer_norm`` as ``native_layer_norm``, ``conv2d`` as ``convolution``).
# Not listed, so recomputed: the attention core, element-wise ops, views, and ``rms_norm``, which
# eager PyTorch on CPU runs as its composite (pow, mean, rsqrt, mul: all recomputed; on CUDA a
# fused ``_fused_rms_norm`` kernel may run instead and would be saved), and BatchNorm.
SELECTIVE_SAVED_OPS = frozenset({
    "linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "conv1d", "conv2d", "conv3d", "convolution",
    "layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "gelu", "silu", "relu", "mish",
    "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
})


@dataclass(frozen=True, slots=True)
class UnitActivations:
    """Bytes one unit saves for backward per sample (compute dtype), by recompute policy; ``*_sharded``
    is the part tensor parallelism divides by ``t``."""

    none: float
    none_sharded: float
    selective: float
    selective_sharded: float
    full: float


def _tp_sharded_values(graph: OpGraph) -> set[str]:
    """Names of the node outputs (and ``node#i`` tensors saved inside nodes) that Megatron-style
    tensor parallelism splits across ranks: outputs of column-parallel layers and everything computed
    from them until a row-parallel (or vocabulary-parallel) layer reduces them again (Shoeybi et al.
    2019, Sec. 3: the attention heads and the MLP's intermediate width). Empty without a TP rule."""
    if graph.facts is None or not graph.facts.tensor_parallel:
        return set()
    from fnmatch import fnmatch

    from trainplan.planner.build_plan import CATALOGUE_TP_STYLES

    styles = dict(CATALOGUE_TP_STYLES)
    if not graph.facts.gated_mlp:
        styles.pop("layers.*.mlp.gate")
    names = {m for u in graph.units for m in u.modules}
    if "lm_head" not in names and ("head.lm_head" in names or "head" in names):
        styles["head.lm_head"] = styles.pop("lm_head")  # as tp_replicated_params / build_plan.tp_styles

    def style(path: str) -> str:
        atoms = path.split(".")
        for pattern, kind in styles.items():
            parts = pattern.split(".")
            if len(parts) == len(atoms) and all(fnmatch(a, p) for a, p in zip(atoms, parts)):
                return kind
        return ""

    sharded: set[str] = set()
    for n in graph.nodes:
        kind = style(n.module_path)
        inner = kind == "colwise" or (kind == "" and any(i in sharded for i in n.inputs))
        if inner:
            sharded.update(f"{n.name}#{i}" for i in range(len(n.saved) + 8))  # its own saved intermediates
        if kind == "colwise" or (kind not in ("rowwise", "vocab") and inner):
            sharded.add(n.name)
    return sharded


def traced_activations(graph: OpGraph) -> list[UnitActivations]:
    """Per unit, what the traced model saves for backward (per sample), by recompute policy.

    * ``none``: the distinct tensors the unit's ops save (``Unit.activation_bytes``: what the real
      ops save — ``scaled_dot_product_attention`` its output and log-sum-exp, not the ``a·s²``
      scores; RMSNorm, rotary tables, expanded key/value heads as the model computes them);
    * ``full`` (blocks): the unit's inputs only, which non-reentrant ``torch.utils.checkpoint``
      keeps (Chen et al. 2016); everything else is rebuilt in backward;
    * ``selective`` (blocks): the inputs plus the outputs the runtime's policy caches
      (:data:`SELECTIVE_SAVED_OPS`, with the statistics a norm kernel saves).

    Units that are not blocks are not checkpointed: all three are ``none``. Bytes are the front
    end's, at the compute dtype (``graph.dtype``).
    """
    sharded = _tp_sharded_values(graph)
    size = {v.name: float(v.bytes) for v in graph.inputs} | {n.name: float(n.output_bytes) for n in graph.nodes}
    out = []
    for u in graph.units:
        nodes = graph.unit_nodes(u)
        saved: dict[str, float] = {}
        for n in nodes:
            for key, nbytes in n.saved:
                saved.setdefault(key, float(nbytes))
        none = float(u.activation_bytes)
        none_sh = sum(b for k, b in saved.items() if k in sharded)
        if u.kind != "block":
            out.append(UnitActivations(none, none_sh, none, none_sh, none))
            continue
        mine = {n.name for n in nodes}
        inputs = dict.fromkeys(i for n in nodes for i in n.inputs if i not in mine and i in size)
        full = sum(size[i] for i in inputs)
        cached: dict[str, float] = {}
        for n in nodes:
            if _op_name(n) in SELECTIVE_SAVED_OPS:
                cached[n.name] = float(n.output_bytes)
                cached.update((k, float(b)) for k, b in n.saved if k.startswith(f"{n.name}#"))
        selective = full + sum(cached.values())
        selective_sh = sum(size[i] for i in inputs if i in sharded) + sum(b for k, b in cached.items() if k in sharded)
        out.append(UnitActivations(none, none_sh, selective, selective_sh, full))
    return out


def loss_saved_bytes(graph: OpGraph) -> float:
    """Bytes per sample the training loss keeps for backward: the cross-entropy's log-softmax of the
    model's output, one fp32 value per output element (``torch.nn.functional.cross_entropy`` saves
    its ``log_softmax`` result; autocast runs it in fp32). Outside the traced model, so added to
    the last unit by the evaluation."""
    if graph.dtype_bytes <= 0:
        return 0.0
    return float(graph.output_bytes) / graph.dtype_bytes * 4
