"""Cut a model into pipeline stages at the plan's boundaries, generically, with torch.fx.

``plan.stages[i].modules`` lists module-path prefixes (``["wte", "wpe", "layers.0", "layers.1"]``).
The model is symbolically traced with those modules kept whole (leaves); every ``call_module``
node goes to the stage that lists it, and every other node (an ``arange``, a residual ``add``,
an unlisted dropout) to the stage of the last listed module before it, so ops between two stages'
modules run on the earlier stage. Each stage becomes its own ``fx.GraphModule``:

* inputs: the values alive at its entry (stage 0: the model's inputs);
* outputs: every value a *later* stage still needs — skip connections are passed through the
  stages in between explicitly, so each stage talks only to its neighbours, as
  ``torch.distributed.pipelining`` requires; the last stage returns the model's output.

Each stage's GraphModule is built on the whole model as root, so its parameters keep their names
in the whole model (``layers.2.attn.q.weight``) — which the initialisation, the tensor-parallel
plan and tied-weight handling are keyed by. ``torch.fx.passes.split_module`` would flatten them
(``layers_2``) and hand skip values from stage 0 straight to stage 2, hence this small splitter.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from torch import fx, nn

from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.structure import under


class StageTracer(fx.Tracer):
    """Keeps the plan's stage modules (and torch's own leaf modules) whole."""

    def __init__(self, stage_modules: Sequence[str]) -> None:
        super().__init__()
        self.stage_modules = frozenset(stage_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.stage_modules or super().is_leaf_module(m, module_qualified_name)


def check_stage_modules(model: nn.Module, stages: Sequence[Sequence[str]]) -> None:
    """Every listed prefix must name a module, and no module may be listed twice."""
    names = {name for name, _ in model.named_modules()}
    seen: dict[str, int] = {}
    for index, prefixes in enumerate(stages):
        for prefix in prefixes:
            if prefix not in names:
                raise PlanExecutionError(f"stages[{index}].modules: {prefix!r} names no module of the model")
            if prefix in seen:
                raise PlanExecutionError(f"stages[{index}].modules: {prefix!r} is already in stage {seen[prefix]}")
            seen[prefix] = index


def trace(model: nn.Module, stages: Sequence[Sequence[str]]) -> fx.Graph:
    """The model's graph with the stage modules as leaves; a clear error when tracing fails."""
    leaves = [p for prefixes in stages for p in prefixes]
    try:
        return StageTracer(leaves).trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types; the message is what matters
        raise PlanExecutionError(
            f"pipeline stages: torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "list the untraceable modules in the stages so they are kept whole, or use pp: 1"
        ) from None


def _stage_of_module(target: str, stages: Sequence[Sequence[str]]) -> int | None:
    for index, prefixes in enumerate(stages):
        if any(under(target, p) for p in prefixes):
            return index
    return None


def assign_stages(graph: fx.Graph, stages: Sequence[Sequence[str]]) -> dict[fx.Node, int]:
    """Stage of every node except the output: listed modules by the plan, the rest follow the cursor."""
    assignment: dict[fx.Node, int] = {}
    cursor = 0
    for node in graph.nodes:
        if node.op == "output":
            continue
        if node.op == "call_module":
            stage = _stage_of_module(str(node.target), stages)
            if stage is not None:
                if stage < cursor:
                    raise PlanExecutionError(
                        f"pipeline stages: module {node.target!r} of stage {stage} runs after a module of stage "
                        f"{cursor}; stage boundaries must follow the order in which the model runs its modules"
                    )
                cursor = stage
        assignment[node] = 0 if node.op == "placeholder" else cursor
    return assignment


def _live_out(graph: fx.Graph, assignment: dict[fx.Node, int], boundary: int) -> list[fx.Node]:
    """Values made at or before stage ``boundary`` and used after it, in graph order."""
    last = max(assignment.values(), default=0)
    out = []
    for node, stage in assignment.items():
        users = [last if u.op == "output" else assignment[u] for u in node.users]
        if stage <= boundary and users and max(users) > boundary:
            out.append(node)
    return out


def _stage_graph(graph: fx.Graph, assignment: dict[fx.Node, int], index: int, inputs: list[fx.Node],
                 outputs: list[fx.Node] | None) -> fx.Graph:
    """Graph of stage ``index``: placeholders for ``inputs``, its nodes, and ``outputs`` (None: the model output)."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = new.placeholder(node.name)
    for node in graph.nodes:
        if node.op == "placeholder" or node.op == "output" or assignment[node] != index:
            continue
        env[node] = new.node_copy(node, lambda n: env[n])
    if outputs is None:
        result = next(n for n in graph.nodes if n.op == "output").args[0]
        new.output(fx.map_arg(result, lambda n: env[n]))
    else:
        values = [env[n] for n in outputs]
        new.output(values[0] if len(values) == 1 else tuple(values))
    return new


def check_kept_whole(model: nn.Module, stages: Sequence[Sequence[str]]) -> None:
    """A module the model declares indivisible (``model.keep_whole``: path -> reason) must sit in one stage."""
    for path, reason in getattr(model, "keep_whole", {}).items():
        holders = {i for i, prefixes in enumerate(stages) for p in prefixes if under(p, path) or under(path, p)}
        if len(holders) > 1:
            raise PlanExecutionError(f"pipeline stages: {path!r} cannot be cut into stages {sorted(holders)}: {reason}")


def split_stages(model: nn.Module, stages: Sequence[Sequence[str]]) -> list[fx.GraphModule]:
    """One GraphModule per stage (``len(stages)`` of them), sharing the model's submodules."""
    check_stage_modules(model, stages)
    check_kept_whole(model, stages)
    graph = trace(model, stages)
    assignment = assign_stages(graph, stages)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    modules = []
    for index in range(len(stages)):
        outputs = None if index == len(stages) - 1 else _live_out(graph, assignment, index)
        if outputs is not None:
            _check_tensors(outputs, index)
        modules.append(fx.GraphModule(model, _stage_graph(graph, assignment, index, inputs, outputs)))
        inputs = outputs or []
    return modules


def _check_tensors(values: list[fx.Node], boundary: int) -> None:
    """Only tensors travel between pipeline stages; a Python value (a shape, a device) cannot."""
    for node in values:
        if node.op == "call_function" and node.target in (getattr, operator.getitem):
            raise PlanExecutionError(
                f"pipeline stages: the value {node.name!r} (not a tensor) is made in stage {boundary} and used "
                f"after it; move the boundary so that its producer and users share a stage"
            )
    if not values:
        raise PlanExecutionError(f"pipeline stages: stage {boundary + 1} receives nothing from stage {boundary}")

