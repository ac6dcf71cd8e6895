"""Small models for front-end tests, each built on the meta device as a BuiltModel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainplan.ir.spec import ModelSpec, TaskSpec
from trainplan.models import BuiltModel, build_model

FEATURES = 8


def classifier(module: nn.Module, features: int = FEATURES, classes: int = 2) -> BuiltModel:
    return BuiltModel(module, TaskSpec(kind="classification", input_shape=[features], classes=classes), None)


def on_meta(cls: type[nn.Module], *args: object) -> nn.Module:
    with torch.device("meta"):
        return cls(*args)


class ThreeLinear(nn.Module):
    """No layer stack: units are the top-level children."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.fc(x))


class LongSkip(nn.Module):
    """The stem's output skips over every block into the head: it crosses every cut."""

    def __init__(self, width: int = 16, layers: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(FEATURES, width)
        self.layers = nn.ModuleList(Residual(width) for _ in range(layers))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.stem(x)
        h = skip
        for layer in self.layers:
            h = layer(h)
        return self.head(h + skip)


class TiedEnds(nn.Module):
    """An embedding whose table is reused, transposed, by the output layer (tied weights)."""

    def __init__(self, vocab: int = 32, width: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Residual(width) for _ in range(layers))
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


def tied_lm(vocab: int = 32, seq: int = 6) -> BuiltModel:
    return BuiltModel(on_meta(TiedEnds, vocab), TaskSpec(kind="lm", vocab=vocab, seq_len=seq), None)


class Gate(nn.Module):
    """Data-dependent control flow: neither torch.export nor symbolic_trace can follow it."""

    def __init__(self, width: int = FEATURES) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, FEATURES)
        self.gate = Gate()
        self.out = nn.Linear(FEATURES, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gate(torch.relu(self.inp(x))))


class Attention(nn.Module):
    """A projection, then causal attention with q = k = v split in heads."""

    def __init__(self, hidden: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q = self.proj(x).view(b, s, self.heads, h // self.heads).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def attention(seq: int = 12, hidden: int = 16, heads: int = 2) -> BuiltModel:
    task = TaskSpec(kind="classification", input_shape=[seq, hidden], classes=hidden)
    return BuiltModel(on_meta(Attention, hidden, heads), task, None)


def gpt(layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 100, seq_len: int = 16,
        **extra: object) -> BuiltModel:
    args = dict(layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq_len=seq_len, **extra)
    return build_model(ModelSpec(catalogue="gpt", args=args), device="meta")


def catalogue(name: str, **args: object) -> BuiltModel:
    return build_model(ModelSpec(catalogue=name, args=args), device="meta")
