"""Run under torchrun: a user script that builds its own model and trains it with ``auto_parallelize``.

``python -m torch.distributed.run --standalone --nproc-per-node 4 api_script.py PLAN OUT`` trains 3
steps of the plan's global batches; rank 0 writes the losses to ``OUT``.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist

from trainplan.ir.loading import load
from trainplan.ir.plan import Plan
from trainplan.models import resolve_task, synthetic_batch
from trainplan.models.gpt import GPT, GPTConfig
from trainplan.runtime.api import auto_parallelize


def main(plan_path: str, out_path: str) -> None:
    plan = load(Plan, plan_path)
    with torch.device("meta"):  # user code builds its own model; trainplan initialises it
        model = GPT(GPTConfig.model_validate(plan.spec.model.args))
    task = resolve_task(plan.spec.model, plan.spec.task)
    rows = plan.micro_batch * plan.num_microbatches
    example = (torch.zeros(rows, task.seq_len or 1, dtype=torch.long),)
    parallel = auto_parallelize(model, example, plan=plan)
    dp_rank = (dist.get_rank() // plan.mesh.tp) % plan.mesh.dp
    losses = []
    for step in range(3):
        inputs, targets = synthetic_batch(task, plan.spec.training.global_batch, plan.spec.training.seed, step)
        mine = slice(dp_rank * rows, (dp_rank + 1) * rows)
        losses.append(parallel.step(inputs[mine], targets[mine]))
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    code = 0
    try:
        main(sys.argv[1], sys.argv[2])
        gc.collect()  # the parallel model (DDP) must be gone before its process group
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - print, then leave without interpreter teardown
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
