"""Deterministic data sharding: every parallel run sees exactly the samples of the serial run.

Step ``s`` uses the global batch ``synthetic_batch(task, global_batch, seed, s)`` — the batch the
single-process run trains on. Data-parallel replica ``d`` takes rows ``[d*R, (d+1)*R)`` of it with
``R = micro_batch * num_microbatches``, and cuts them into ``num_microbatches`` micro-batches of
``micro_batch`` rows, in order. Tensor-parallel and pipeline ranks of one replica take the same
rows (pipeline stages other than the first use only the targets).

Loss: the serial run minimises the mean loss over the global batch. Every sample of the synthetic
tasks carries the same number of loss terms (``seq_len`` tokens or one label), so that mean equals
the mean over replicas of the mean over micro-batches of each micro-batch's mean loss — which is
what the runtime computes: each micro-batch's loss is divided by ``num_microbatches`` (or the
pipeline schedule scales the gradients by it) and data parallelism averages over replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainplan.ir.plan import Plan
from trainplan.ir.spec import TaskSpec
from trainplan.models import synthetic_batch


@dataclass(frozen=True, slots=True)
class Shard:
    """Which rows of the global batch a replica trains on, and how they are cut."""

    replica: int
    replicas: int
    micro_batch: int
    num_microbatches: int

    @property
    def rows(self) -> int:
        return self.micro_batch * self.num_microbatches

    @property
    def start(self) -> int:
        return self.replica * self.rows


def shard_of(plan: Plan, dp_rank: int) -> Shard:
    """The data shard of data-parallel replica ``dp_rank`` under ``plan``."""
    if not 0 <= dp_rank < plan.mesh.dp:
        raise ValueError(f"replica {dp_rank} is outside dp={plan.mesh.dp}")
    return Shard(dp_rank, plan.mesh.dp, plan.micro_batch, plan.num_microbatches)


def replica_batch(
    task: TaskSpec, global_batch: int, seed: int, step: int, shard: Shard
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` rows of the global batch of ``step`` that ``shard`` trains on."""
    if shard.rows * shard.replicas != global_batch:
        raise ValueError(
            f"{shard.replicas} replicas x {shard.rows} rows do not make the global batch of {global_batch}"
        )
    inputs, targets = synthetic_batch(task, global_batch, seed, step)
    rows = slice(shard.start, shard.start + shard.rows)
    return inputs[rows], targets[rows]


def microbatches(tensor: torch.Tensor, shard: Shard) -> list[torch.Tensor]:
    """``tensor``'s rows cut into the shard's micro-batches, in order."""
    if tensor.shape[0] != shard.rows:
        raise ValueError(f"expected {shard.rows} rows, got {tensor.shape[0]}")
    return list(tensor.split(shard.micro_batch))


def tokens_per_sample(task: TaskSpec) -> int:
    """Tokens one sample contributes to throughput: ``seq_len`` for language models, 1 otherwise."""
    if task.kind == "lm":
        return task.seq_len or 1
    return 1
