"""A per-rank entry point for launcher tests: proves the world the launcher formed is the one asked for.

``python rank_probe.py --plan PLAN --out DIR [--fail-first-attempt RANK]``: join the process group
from torchrun's environment (with a timeout), all-reduce the rank, and write ``DIR/rank-<r>.json``
with what this rank saw. ``--fail-first-attempt R`` makes rank R exit 3 on the first attempt only,
to exercise elastic restarts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
            "CUDA_VISIBLE_DEVICES", "SLURM_NODEID")


def probe(args: argparse.Namespace) -> dict[str, object]:
    """Join the group, all-reduce ranks and gather node ranks; return what this rank saw."""
    import torch  # here, so that a rank failing on purpose leaves at once
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = args.backend == "nccl"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, timeout=timedelta(seconds=args.timeout_s))
    total = torch.tensor([rank], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    nodes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(nodes, torch.tensor([int(os.environ["GROUP_RANK"])], dtype=torch.int64, device=device))
    dist.barrier()
    dist.destroy_process_group()
    return {"env": {k: os.environ.get(k) for k in ENV_KEYS}, "rank_sum": int(total.item()),
            "node_of_rank": [int(n.item()) for n in nodes], "plan": args.plan, "host": socket.gethostname(),
            "device": str(device), "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--fail-first-attempt", type=int, default=None)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    if args.fail_first_attempt == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        print(f"rank {rank}: failing on purpose in attempt 0", file=sys.stderr, flush=True)
        os._exit(3)
    result = probe(args)
    path = args.out / f"rank-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(result))
    os.replace(path.with_suffix(".tmp"), path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown after a process group (TORCH-NOTES)


if __name__ == "__main__":
    main()
