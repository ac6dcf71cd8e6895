"""The convolution kernel variant (trainplan.passes.interpret._conv_variant) against the kernel torch
actually runs on this CPU, and as the graph front end records it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile

from tests.passes import toys
from trainplan.ir.spec import TaskSpec
from trainplan.models.registry import BuiltModel
from trainplan.passes import build_graph
from trainplan.passes.interpret import _conv_variant

# (in channels, out channels, side, kernel, stride, groups)
SHAPES = [
    (3, 16, 32, 3, 1, 1),  # a stem
    (16, 16, 32, 3, 1, 1),  # 16384 input elements
    (16, 32, 32, 3, 2, 1),  # strided
    (32, 64, 16, 1, 2, 1),  # a strided 1x1 shortcut
    (20, 20, 32, 3, 1, 1),  # 20480 elements: the last native size
    (21, 21, 32, 3, 1, 1),  # 21504: oneDNN
    (8, 8, 16, 5, 1, 1),  # 5x5 kernel: oneDNN
    (16, 16, 16, 3, 1, 4),  # grouped: oneDNN
]


def _runs_native(x: torch.Tensor, w: torch.Tensor, stride: int, groups: int) -> bool:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every worker of a run on this machine
    try:
        with profile() as prof:
            F.conv2d(x, w, None, stride=stride, padding=w.shape[-1] // 2, groups=groups).sum().backward()
    finally:
        torch.set_num_threads(threads)
    names = {e.name for e in prof.events()}
    assert ("aten::mkldnn_convolution" in names) != ("aten::_slow_conv2d_forward" in names), names
    return "aten::_slow_conv2d_forward" in names


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("cin, cout, side, k, stride, groups", SHAPES)
def test_native_is_the_kernel_torch_runs_for_one_sample(cin: int, cout: int, side: int, k: int, stride: int,
                                                        groups: int) -> None:
    x = torch.randn(1, cin, side, side, requires_grad=True)
    w = torch.randn(cout, cin // groups, k, k, requires_grad=True)
    variant = _conv_variant("aten.conv2d.default", (x, w, None, [stride, stride], [k // 2] * 2, [1, 1], groups), {})
    assert (variant == "native") == _runs_native(x, w, stride, groups)
    # two samples (none of these is an unstrided 1x1): oneDNN whatever the variant says, the base entry
    assert not _runs_native(torch.randn(2, cin, side, side, requires_grad=True), w, stride, groups)


class _TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Conv2d(3, 8, 3, padding=1)
        self.wide = nn.Conv2d(8, 8, 5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide(F.relu(self.small(x))).mean((2, 3))


def test_the_graph_records_each_convolutions_kernel() -> None:
    built = BuiltModel(toys.on_meta(_TwoConvs), TaskSpec(kind="classification", input_shape=[3, 16, 16], classes=8),
                       None)
    graph = build_graph(built)
    convs = [n for n in graph.nodes if n.target.endswith("conv2d.default") or n.target.endswith("conv2d")]
    assert [n.variant for n in convs] == ["native", ""]
    assert _conv_variant("aten.linear.default", (torch.ones(1, 2), torch.ones(2, 2)), {}) == ""
