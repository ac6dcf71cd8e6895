"""Run under torchrun: a user script that lets ``trainplan.auto_parallelize`` plan and parallelise its models.

``python -m torch.distributed.run --standalone --nproc-per-node 4 auto_script.py OUT`` trains, each
for 3 steps on the serial run's global batches:

- ``gpt``: the catalogue GPT built on meta by the script (trainplan initialises it), planned freely;
- ``user``: a plain ``nn.Sequential`` classifier with its own real weights, planned with ``dp=2`` fixed.

Rank 0 writes ``{"gpt": {"losses", "layout"}, "user": {...}}`` to ``OUT`` (JSON).
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import trainplan
from trainplan.models import synthetic_batch
from trainplan.models.gpt import GPT, GPTConfig

GPT_ARGS = {"layers": 4, "hidden": 32, "heads": 4, "vocab": 64, "seq_len": 16, "tie_embeddings": True}
GPT_TRAINING = {"global_batch": 8, "optimizer": "adam", "lr": 1e-3, "seed": 3}
USER_TRAINING = {"global_batch": 16, "optimizer": "adam", "lr": 1e-2, "seed": 5}


def user_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 10))


def train(plan, model, steps: int = 3) -> list[float]:  # noqa: ANN001
    task, training = plan.spec.task, plan.spec.training
    losses = []
    for step in range(steps):
        inputs, targets = synthetic_batch(task, training.global_batch, training.seed, step)
        losses.append(model.step(model.replica_rows(inputs), model.replica_rows(targets)))
    return losses


def main(out_path: str) -> None:
    results = {}
    with torch.device("meta"):
        gpt = GPT(GPTConfig.model_validate(GPT_ARGS))
    example = (torch.zeros(GPT_TRAINING["global_batch"], GPT_ARGS["seq_len"], dtype=torch.long),)
    plan, model = trainplan.auto_parallelize(gpt, example, training=GPT_TRAINING)
    results["gpt"] = {"losses": train(plan, model), "mesh": plan.mesh.model_dump(), "schedule": plan.schedule}
    del model
    gc.collect()
    example = (torch.zeros(USER_TRAINING["global_batch"], 12),)
    plan, model = trainplan.auto_parallelize(user_model(), example, training=USER_TRAINING, dp=2)
    results["user"] = {"losses": train(plan, model), "mesh": plan.mesh.model_dump(), "task": plan.spec.task.model_dump()}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    code = 0
    try:
        main(sys.argv[1])
        gc.collect()  # the parallel models (DDP) must be gone before their process group
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - print, then leave without interpreter teardown
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
