"""A model that fails on purpose on one rank, for the runtime's failure tests (``model: {import: ...}``)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import nn

from trainplan.models.mlp import MLP, MLPConfig

DIE_EXIT_CODE = 17


class Faulty(nn.Module):
    """An MLP whose forward, on ``rank`` after ``after`` calls, dies (os._exit), stalls, or raises."""

    def __init__(self, inner: nn.Module, mode: str, rank: int, after: int) -> None:
        super().__init__()
        self.inner = inner
        self.mode, self.rank, self.after = mode, rank, after
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if dist.is_initialized() and dist.get_rank() == self.rank and self.calls > self.after:
            if self.mode == "die":
                os._exit(DIE_EXIT_CODE)  # like a process killed for memory: no traceback, no record
            if self.mode == "stall":
                time.sleep(3600)
            raise RuntimeError(f"injected failure on rank {self.rank}")
        return self.inner(x)


def build(mode: str, rank: int, after: int = 1, input_dim: int = 12, classes: int = 10) -> Faulty:
    return Faulty(MLP(MLPConfig(input_dim=input_dim, hidden=16, layers=2, classes=classes)), mode, rank, after)
