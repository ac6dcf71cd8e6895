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
from trainplan.ir.graph import OpGraph

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
    units = tuple(
        UnitCost(u.name, u.kind, u.modules, float(u.params), u.flops_fwd, u.flops_bwd, float(u.activation_bytes),
                 float(u.output_bytes), float(r))
        for u, r in zip(graph.units, replicated)
    )
    shared = []
    for names, holders in zip(graph.tied, graph.tied_units):
        owner = index[holders[0]]
        count = float(_param_count(graph, names))
        shared += [(index[h], owner, count) for h in holders[1:]]
    batch_norms = tuple(path for path, cls in graph.module_classes if BATCH_STATISTICS.search(cls))
    return ModelCosts(units, graph.facts, float(graph.params), tuple(sorted(shared)), batch_norms)


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
