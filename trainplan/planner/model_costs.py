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
    ops: tuple = ()  # the unit's operators (trainplan.planner.cost.ops.OpUse), for measured op costs; () untraced
    param_tensors: float = 0.0  # parameter tensors the unit owns (an optimizer's fixed cost is per tensor); 0 untraced
    act_entry: float = 0.0  # saved here and by an earlier unit (counted there): a stage starting here holds its own copy
    tp_layers: int = 0  # modules tensor parallelism turns into DTensor layers (colwise, rowwise, vocab, qkv) that the unit calls
    tp_param_tensors: int = 0  # of ``param_tensors``, those that become DTensors under tensor parallelism
    saved_tensors: int = 0  # activations the unit's ops save for backward, per op (:func:`saved_tensor_count`); 0 untraced


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


def model_costs_from_graph(graph: OpGraph, hf_arch: str | None = None) -> ModelCosts:
    """The unit chain of a traced graph (per-sample costs as measured by the front end).

    ``hf_arch``: the Hugging Face family of the model (``spec.model.hf.arch``), whose
    tensor-parallel styles the plan will carry; None for the catalogue's (:func:`planned_tp_styles`).
    """
    index = {u.name: i for i, u in enumerate(graph.units)}
    styles = planned_tp_styles(graph, hf_arch)
    replicated = tp_replicated_params(graph, styles) if graph.facts is not None else [0] * len(graph.units)
    acts = traced_activations(graph, styles)
    ops = graph_op_uses(graph, styles)
    tensors = owned_param_tensors(graph)
    entry = stage_entry_bytes(graph)
    dtensor = tp_dtensor_counts(graph, styles)
    units = tuple(
        UnitCost(u.name, u.kind, u.modules, float(u.params), u.flops_fwd, u.flops_bwd, a.none,
                 float(u.output_bytes), float(r), float(unit_kernels(graph.unit_nodes(u))), a.none_sharded,
                 a.selective, a.selective_sharded, a.full, o, float(t), e, layers, dparams,
                 saved_tensor_count(graph.unit_nodes(u)))
        for u, r, a, o, t, e, (layers, dparams) in zip(graph.units, replicated, acts, ops, tensors, entry, dtensor)
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


def saved_tensor_count(nodes: tuple[OpNode, ...] | list[OpNode]) -> int:
    """Activation tensors ``nodes`` save for backward, counted per op (a tensor two ops save counts
    twice; parameters not at all): what the checkpointing machinery handles one by one. Non-reentrant
    ``torch.utils.checkpoint`` packs each saved tensor in the forward and unpacks it from the
    recomputation in the backward (PyTorch ``torch/utils/checkpoint.py``, ``_checkpoint_hook``); the
    selective policy caches and replays the saved ops' outputs. Measured: the machinery's cost per
    block follows this count across the catalogue's GPT, llama and BERT and the calibration's generic
    network, where the traced-operator count put llama's (52 operators, most of them light rotary and
    RMSNorm arithmetic) at 1.5-2x its measurement (docs/accuracy.md, eighth session)."""
    return sum(len(n.saved) for n in nodes)


def stage_entry_bytes(graph: OpGraph) -> list[float]:
    """Per unit, the bytes per sample it saves for backward that an earlier unit saved first.

    Within one process a tensor two units save is one storage, counted in the first unit
    (:func:`traced_activations`). A pipeline stage that starts at this unit receives that tensor
    from the previous stage as a new tensor of its own (a CNN block's input is the ReLU output the
    previous block saved), so the stage holds it again: the evaluation adds these bytes to a
    stage's activations when the unit is the stage's first. Policy ``none``; 0 for the first unit.
    """
    seen: set[str] = set()
    out = []
    for u in graph.units:
        mine: dict[str, int] = {}
        for n in graph.unit_nodes(u):
            for key, nbytes in n.saved:
                mine.setdefault(key, nbytes)
        out.append(float(sum(b for k, b in mine.items() if k in seen)))
        seen.update(mine)
    return out


def owned_param_tensors(graph: OpGraph) -> list[int]:
    """Per unit, the parameter tensors it reads first (tied ones once, in their first unit)."""
    seen: set[str] = set()
    out = []
    for u in graph.units:
        names = {p for n in graph.unit_nodes(u) for p in n.param_names} - seen
        seen |= names
        out.append(len(names))
    return out


def graph_op_uses(graph: OpGraph, styles: dict[str, str] | None = None) -> list[tuple]:
    """Per unit, its operators for the measured-op cost model (:func:`trainplan.planner.op_uses.unit_op_uses`),
    with the work tensor parallelism divides taken from the plan's ``styles`` (:func:`_tp_sharded_values`)."""
    from trainplan.planner.op_uses import unit_op_uses

    return unit_op_uses(graph, _tp_sharded_values(graph, styles))


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
    is replicated, as is every parameter of an unlisted module (Shoeybi et al. 2019, Sec. 3). A fused
    ``qkv`` projection's bias stays whole too (``runtime.tensor_parallel.Conv1DColwise``)."""
    module, _, leaf = name.rpartition(".")
    style = style_of(module, styles)
    return style in ("colwise", "vocab") or (style in ("rowwise", "qkv") and leaf != "bias")


# Styles under which ``parallelize_module`` makes a module's parameters and its input DTensors.
DTENSOR_STYLES = frozenset({"colwise", "rowwise", "vocab", "qkv"})


def style_of(path: str, styles: dict[str, str]) -> str:
    """The tensor-parallel style ``styles`` gives module ``path`` (patterns with one glob per dotted
    atom, as ``parallelize_module`` matches them); ``''`` for none."""
    from fnmatch import fnmatch

    atoms = path.split(".")
    for pattern, kind in styles.items():
        parts = pattern.split(".")
        if len(parts) == len(atoms) and all(fnmatch(a, p) for a, p in zip(atoms, parts)):
            return kind
    return ""


def tp_dtensor_counts(graph: OpGraph, styles: dict[str, str]) -> list[tuple[int, int]]:
    """Per unit, (tensor-parallel layers it calls, parameter tensors it owns that become DTensors)
    under ``styles``: what DTensor's per-layer and per-parameter overheads
    (``device.tp_overhead``) multiply. A layer called twice in a unit counts once, a parameter in
    the unit that reads it first (:func:`owned_param_tensors`). (0, 0) everywhere for a model
    without a tensor-parallel rule."""
    if graph.facts is None or not graph.facts.tensor_parallel:
        return [(0, 0)] * len(graph.units)
    seen: set[str] = set()
    out = []
    for u in graph.units:
        nodes = graph.unit_nodes(u)
        called = {n.module_path for n in nodes if n.module_path}
        layers = sum(1 for path in called if style_of(path, styles) in DTENSOR_STYLES)
        names = {p for n in nodes for p in n.param_names} - seen
        seen |= names
        params = sum(1 for name in names if style_of(name.rpartition(".")[0], styles) in DTENSOR_STYLES)
        out.append((layers, params))
    return out


def planned_tp_styles(graph: OpGraph, hf_arch: str | None = None) -> dict[str, str]:
    """The tensor-parallel styles a plan of this model carries (``build_plan.tp_styles`` at tp > 1):
    the Hugging Face family's, or the catalogue's adjusted to the graph's module names."""
    from trainplan.planner.build_plan import model_tp_styles

    gated = graph.facts is None or graph.facts.gated_mlp
    return model_tp_styles(hf_arch, {m for u in graph.units for m in u.modules}, gated)


def tp_replicated_params(graph: OpGraph, styles: dict[str, str] | None = None) -> list[int]:
    """Per unit, the elements of the parameters it owns (first reads) that the plan's tensor-parallel
    ``styles`` (default: :func:`planned_tp_styles` of a catalogue model) leave whole on every rank."""
    styles = planned_tp_styles(graph) if styles is None else styles
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


def _tp_sharded_values(graph: OpGraph, styles: dict[str, str] | None = None) -> set[str]:
    """Names of the node outputs (and ``node#i`` tensors saved inside nodes) that Megatron-style
    tensor parallelism splits across ranks: outputs of column-parallel layers and everything computed
    from them until a row-parallel (or vocabulary-parallel) layer reduces them again (Shoeybi et al.
    2019, Sec. 3: the attention heads and the MLP's intermediate width). Empty without a TP rule."""
    if graph.facts is None or not graph.facts.tensor_parallel:
        return set()
    styles = planned_tp_styles(graph) if styles is None else styles
    sharded: set[str] = set()
    for n in graph.nodes:
        kind = style_of(n.module_path, styles)
        column = kind in ("colwise", "qkv")
        inner = column or (kind == "" and any(i in sharded for i in n.inputs))
        if inner:
            sharded.update(f"{n.name}#{i}" for i in range(len(n.saved) + 8))  # its own saved intermediates
        if column or (kind not in ("rowwise", "vocab") and inner):
            sharded.add(n.name)
    return sharded


def traced_activations(graph: OpGraph, styles: dict[str, str] | None = None) -> list[UnitActivations]:
    """Per unit, what the traced model saves for backward (per sample), by recompute policy.

    * ``none``: the distinct tensors the unit's ops save (``Unit.activation_bytes``: what the real
      ops save — ``scaled_dot_product_attention`` its output and log-sum-exp, not the ``a·s²``
      scores; RMSNorm, rotary tables, expanded key/value heads as the model computes them);
    * ``full`` (blocks): the unit's inputs only, which non-reentrant ``torch.utils.checkpoint``
      keeps (Chen et al. 2016); everything else is rebuilt in backward;
    * ``selective`` (blocks): the inputs plus the outputs the runtime's policy caches
      (:data:`SELECTIVE_SAVED_OPS`, with the statistics a norm kernel saves).

    Units that are not blocks are not checkpointed: all three are their ``none``. A tensor several
    units hold is one storage (a ReLU output saved by one block and read, saved or checkpointed,
    by the next), so it counts once, in the first unit holding it under the policy, as
    ``Unit.activation_bytes`` does for ``none`` (:mod:`trainplan.passes.linearise`): the units then
    add up to the model's distinct saved storages, what ``torch.autograd.graph.saved_tensors_hooks``
    sees (``SavedTensorTracker``, :mod:`trainplan.runtime.measure`). One exception keeps the
    non-blocks' single value right under every policy: a tensor a block saves and a later non-block
    saves too (an MLP's last ReLU output, saved again by the classifier) counts in the block's
    ``selective`` / ``full`` even where the block does not keep it, since the non-block leaves it
    out. Bytes are the front end's, at the compute dtype (``graph.dtype``).
    """
    sharded = _tp_sharded_values(graph, styles)
    size = {v.name: float(v.bytes) for v in graph.inputs} | {n.name: float(n.output_bytes) for n in graph.nodes}
    saved: list[dict[str, float]] = []  # per unit, the tensors its ops save (policy none)
    held: dict[str, list[dict[str, float]]] = {"selective": [], "full": []}  # per policy, what each unit keeps
    for u in graph.units:
        nodes = graph.unit_nodes(u)
        mine: dict[str, float] = {}
        for n in nodes:
            for key, nbytes in n.saved:
                mine.setdefault(key, float(nbytes))
        saved.append(mine)
        if u.kind != "block":
            held["selective"].append(mine)
            held["full"].append(mine)
            continue
        own = {n.name for n in nodes}
        inputs = {i: size[i] for n in nodes for i in n.inputs if i not in own and i in size}
        cached: dict[str, float] = {}
        for n in nodes:
            if _op_name(n) in SELECTIVE_SAVED_OPS:
                cached[n.name] = float(n.output_bytes)
                cached.update((k, float(b)) for k, b in n.saved if k.startswith(f"{n.name}#"))
        held["full"].append(inputs)
        held["selective"].append(inputs | cached)
    blocks = [u.kind == "block" for u in graph.units]
    none = _counted_once(saved, saved, blocks, sharded)
    sel = _counted_once(held["selective"], saved, blocks, sharded)
    full = _counted_once(held["full"], saved, blocks, sharded)
    out = []
    for i, u in enumerate(graph.units):
        if blocks[i]:
            out.append(UnitActivations(float(u.activation_bytes), none[i][1], sel[i][0], sel[i][1], full[i][0]))
        else:
            out.append(UnitActivations(float(u.activation_bytes), none[i][1], float(u.activation_bytes), none[i][1],
                                       float(u.activation_bytes)))
    return out


def _counted_once(held: list[dict[str, float]], saved: list[dict[str, float]], blocks: list[bool],
                  sharded: set[str]) -> list[tuple[float, float]]:
    """Per unit, (bytes, of them tensor-parallel sharded) of the tensors counted there: each held
    tensor once, in the first unit holding it, or, when that unit is not a block, in the first unit
    saving it (see :func:`traced_activations`)."""
    first_saver: dict[str, int] = {}
    for i, keys in enumerate(saved):
        for k in keys:
            first_saver.setdefault(k, i)
    out = [[0.0, 0.0] for _ in held]
    seen: set[str] = set()
    for i, keys in enumerate(held):
        for k, b in keys.items():
            if k in seen:
                continue
            seen.add(k)
            j = i if blocks[i] else first_saver.get(k, i)
            out[j][0] += b
            out[j][1] += b if k in sharded else 0.0
    return [(b, sh) for b, sh in out]


def loss_saved_bytes(graph: OpGraph) -> float:
    """Bytes per sample the training loss keeps for backward: the cross-entropy's log-softmax of the
    model's output, one fp32 value per output element (``torch.nn.functional.cross_entropy`` saves
    its ``log_softmax`` result; autocast runs it in fp32). Outside the traced model, so added to
    the last unit by the evaluation."""
    if graph.dtype_bytes <= 0:
        return 0.0
    return float(graph.output_bytes) / graph.dtype_bytes * 4
