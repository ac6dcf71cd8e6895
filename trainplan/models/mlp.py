"""Multi-layer perceptron classifier: ``layers`` blocks of Linear + ReLU, then a linear classifier.

Input: float ``(batch, *input_shape)``, flattened per sample. Output: logits ``(batch, classes)``.
Parameter count (elements), D = prod(input_shape), H = hidden, L = layers, C = classes:
``(D*H + H) + (L - 1)*(H^2 + H) + (H*C + C)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from trainplan.ir.base import Strict


class MLPConfig(Strict):
    input_dim: PositiveInt | None = Field(None, description="Features per sample (give this or input_shape).")
    input_shape: list[PositiveInt] | None = Field(
        None, description="Shape of one sample, flattened before the first layer (give this or input_dim)."
    )
    hidden: PositiveInt = Field(512, description="Width of each hidden layer.")
    layers: PositiveInt = Field(2, description="Hidden Linear+ReLU layers.")
    classes: PositiveInt = Field(10, description="Output classes.")

    @model_validator(mode="after")
    def _one_input(self) -> "MLPConfig":
        if (self.input_dim is None) == (self.input_shape is None):
            raise ValueError("expected exactly one of 'input_dim' or 'input_shape'")
        if self.input_shape is not None and not self.input_shape:
            raise ValueError("input_shape must have at least one dimension")
        return self

    @property
    def features(self) -> int:
        return self.input_dim if self.input_dim is not None else math.prod(self.input_shape or [])

    @property
    def sample_shape(self) -> list[int]:
        return list(self.input_shape) if self.input_shape is not None else [self.features]

    def input_problem(self, shape: list[int]) -> str | None:
        """Why a task's sample shape cannot feed this model, or None if it can."""
        if math.prod(shape) != self.features:
            return f"the model takes {self.features} features per sample, got shape {shape} ({math.prod(shape)})"
        return None


class Dense(nn.Module):
    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(fan_in, fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.config = cfg
        widths = [cfg.features] + [cfg.hidden] * cfg.layers
        self.layers = nn.ModuleList(Dense(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(cfg.hidden, cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build_mlp(cfg: MLPConfig) -> MLP:
    return MLP(cfg)
