"""The front end: a built model in, a frozen, costed :class:`~trainplan.ir.graph.OpGraph` out.

``capture`` (FX graphs on meta/fake tensors, repeated blocks traced once) → ``annotate`` (shapes,
dtypes, FLOPs, parameters, activation bytes per node) → ``linearise`` (pipeline units and the
bytes crossing each cut) → ``detect_blocks`` (block types). Every step after capture returns a
new frozen graph that :func:`verify` accepts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainplan.ir.graph import OpGraph
from trainplan.models import BuiltModel
from trainplan.passes.annotate import annotate
from trainplan.passes.blocks import detect_blocks
from trainplan.passes.capture import FRONTENDS, Captured, Frontend, capture
from trainplan.passes.linearise import linearise
from trainplan.passes.verify import CHECKS, GraphInvariantError, verify


def build_graph(
    built: BuiltModel,
    *,
    dtype: torch.dtype = torch.float32,
    leaf_modules: Sequence[str] = (),
    frontends: Sequence[Frontend] = FRONTENDS,
) -> OpGraph:
    """The whole front end. Costs are per sample; activations counted at ``dtype``'s width.

    ``leaf_modules`` are class names or module paths traced as one opaque node (for code the
    tracers cannot follow); ``frontends`` the tracers to try, in order.
    """
    return detect_blocks(linearise(annotate(capture(built, leaf_modules, frontends=frontends), dtype)))


__all__ = [
    "CHECKS",
    "FRONTENDS",
    "Captured",
    "Frontend",
    "GraphInvariantError",
    "annotate",
    "build_graph",
    "capture",
    "detect_blocks",
    "linearise",
    "verify",
]
