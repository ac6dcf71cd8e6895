"""A small ResNet-style classifier for images such as ``[3, 32, 32]``.

He et al. 2016 (arXiv:1512.03385): a 3x3 stem, then stages of *basic blocks* (two 3x3 conv +
BatchNorm, identity shortcut; §3.3 projection shortcut — 1x1 conv + BatchNorm — where the width or
stride changes), stride 2 at the first block of every stage after the first, global average
pooling and a linear classifier (the CIFAR-10 layout of §4.2 with configurable widths).

Input: float ``(batch, C, H, W)``. Output: logits ``(batch, classes)``. BatchNorm normalises over
the batch it is given, so data-parallel or micro-batched runs see per-replica statistics and do
not reproduce one process's numbers; ``norm: group`` uses GroupNorm instead (Wu & He 2018, 8
groups where the width allows, the same 2 parameters per channel), which normalises each sample
alone, so every plan of it trains exactly like one process.

Parameter count (elements), convolutions without bias, BatchNorm 2 per channel: stem
``9*C*w0 + 2*w0``; a block from a to b channels ``9*a*b + 9*b*b + 4b`` plus ``a*b + 2b`` when it
projects; classifier ``w_last*classes + classes``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from trainplan.ir.base import Strict


class CNNConfig(Strict):
    input_shape: list[PositiveInt] = Field([3, 32, 32], description="Shape of one image: [channels, height, width].")
    classes: PositiveInt = Field(10, description="Output classes.")
    widths: list[PositiveInt] = Field([16, 32, 64], description="Channels of each stage.")
    blocks: PositiveInt = Field(2, description="Basic blocks per stage.")
    norm: Literal["batch", "group"] = Field(
        "batch", description="batch: BatchNorm (per-replica, per-micro-batch statistics); group: GroupNorm "
        "(per sample, so parallel runs equal one process)."
    )

    @model_validator(mode="after")
    def _shapes(self) -> "CNNConfig":
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be [channels, height, width], got {self.input_shape}")
        if not self.widths:
            raise ValueError("widths must list at least one stage")
        return self

    @property
    def sample_shape(self) -> list[int]:
        return list(self.input_shape)

    def input_problem(self, shape: list[int]) -> str | None:
        """Why a task's sample shape cannot feed this model, or None if it can.

        Global pooling makes any height and width work; the channels must match the stem.
        """
        if len(shape) != 3 or shape[0] != self.input_shape[0]:
            return f"the model takes images [{self.input_shape[0]}, height, width], got {shape}"
        return None


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm2d, or GroupNorm with 8 groups (Wu & He 2018, Sec. 4) or fewer when 8 does not divide the width."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(8, channels), channels)


class BasicBlock(nn.Module):
    def __init__(self, fan_in: int, fan_out: int, stride: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(fan_in, fan_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(norm, fan_out)
        self.conv2 = nn.Conv2d(fan_out, fan_out, 3, padding=1, bias=False)
        self.bn2 = norm_layer(norm, fan_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or fan_in != fan_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(fan_in, fan_out, 1, stride=stride, bias=False), norm_layer(norm, fan_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.config = cfg
        self.stem = nn.Conv2d(cfg.input_shape[0], cfg.widths[0], 3, padding=1, bias=False)
        self.bn = norm_layer(cfg.norm, cfg.widths[0])
        self.layers = nn.ModuleList(_stage_blocks(cfg))
        self.head = nn.Linear(cfg.widths[-1], cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        for layer in self.layers:
            x = layer(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _stage_blocks(cfg: CNNConfig) -> list[BasicBlock]:
    """All blocks in order, flat, so the pipeline front end sees one list of cuttable units."""
    blocks = []
    fan_in = cfg.widths[0]
    for stage, width in enumerate(cfg.widths):
        for i in range(cfg.blocks):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(fan_in, width, stride, cfg.norm))
            fan_in = width
    return blocks


def build_cnn(cfg: CNNConfig) -> ResNet:
    return ResNet(cfg)
