"""One worker process of a run: ``python -m trainplan.runtime.worker --run-dir RUN --plan PLAN --out DIR``.

Started by :func:`trainplan.runtime.launch.launch` (torch's elastic agent) or by ``torchrun`` /
Slurm / Kubernetes directly: it reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the
environment and rendezvouses through ``MASTER_ADDR``/``MASTER_PORT``. It checks the world size
against the plan before doing anything else, joins the process group with the plan's collective
timeout, trains, and leaves through ``os._exit`` after flushing (interpreter teardown after a
process group can abort: TORCH-NOTES).

``--plan``/``--out`` may repeat: the plans (a sweep, all for the same world size) then run one after
the other in the same process group, each on its own mesh, each writing to its own folder.

A failure is written to ``RUN/failures/rank-<r>.json`` with the time it happened, the plan it
happened in, and whether it was this rank's own error or a collective that broke because a peer
died or stalled; the launcher uses these to name the rank that failed first.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from trainplan.errors import TrainplanError
from trainplan.ir.loading import load
from trainplan.ir.plan import Plan
from trainplan.runtime.checkpoint import CheckpointOptions
from trainplan.runtime.data_parallel import parse_straggler
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.mesh import build_mesh, check_world_size
from trainplan.runtime.parallelize import check_plan
from trainplan.runtime.precision import flush_denormals
from trainplan.runtime.stores import join_process_group
from trainplan.runtime.train import train

PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out",
                "Broken pipe", "Connection refused")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainplan.runtime.worker", description="One worker of a plan's run.")
    p.add_argument("--run-dir", type=Path, required=True, help="folder of the run's failure records")
    p.add_argument("--plan", type=Path, action="append", required=True, help="plan YAML (repeat for a sweep)")
    p.add_argument("--out", type=Path, action="append", required=True,
                   help="output folder of the matching --plan (rank 0 writes the metrics)")
    p.add_argument("--steps", type=int, default=None, help="steps to run (default: the spec's)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of this process")
    p.add_argument("--save-params", action="store_true", help="write the final parameters to OUT/params")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="checkpoint folder (default: OUT/ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="save a checkpoint every N steps")
    p.add_argument("--checkpoint-minutes", type=float, default=None, help="also save when M minutes have passed")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="complete checkpoints to keep (default 3)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--resume-if-present", action="store_true",
                   help="continue from the newest complete checkpoint when there is one, else start at step 0 "
                   "(cluster launches: a restarted or requeued job resumes)")
    p.add_argument("--checkpoint-async", action="store_true",
                   help="write checkpoints in the background while training continues")
    p.add_argument("--straggler", type=parse_straggler, default=None, metavar="RANK:SECONDS",
                   help="delay RANK by SECONDS every step (the straggler experiment)")
    return p.parse_args(argv)


def checkpoint_options(args: argparse.Namespace) -> CheckpointOptions | None:
    """The run's checkpointing, or None; a restarted attempt of an elastic run resumes when it can."""
    if not (args.resume or args.resume_if_present or args.checkpoint_every or args.checkpoint_minutes):
        return None
    if len(args.plan) != 1:
        raise PlanExecutionError("checkpoints and --resume are for a single plan, not a sweep")
    restarted = env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0
    return CheckpointOptions(args.checkpoint_dir or args.out[0] / "ckpt", every_steps=args.checkpoint_every,
                             every_minutes=args.checkpoint_minutes, keep=args.keep_checkpoints,
                             resume=args.resume, resume_if_present=restarted or args.resume_if_present,
                             asynchronous=args.checkpoint_async)


def env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise PlanExecutionError(f"{name} is not set: start workers with trainplan's launcher or torchrun")
        return default
    return int(value)


def select_device(backend: str, local_rank: int) -> torch.device:
    """CPU for gloo; this process's GPU for NCCL (with a clear error when there is none)."""
    if backend != "nccl":
        return torch.device("cpu")
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        raise PlanExecutionError(
            f"the plan's cluster uses NCCL (GPUs) but local rank {local_rank} has no CUDA device "
            f"({torch.cuda.device_count()} visible); plan for a gloo cluster (cluster: {{preset: cpu-local}}) to run on CPUs"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def run(args: argparse.Namespace, current: list[Path]) -> None:
    """Check every plan, join the group, train each plan in turn, leave the group.

    ``current`` receives the plan being run, for the failure record.
    """
    if len(args.plan) != len(args.out):
        raise PlanExecutionError(f"{len(args.plan)} --plan but {len(args.out)} --out; give one folder per plan")
    plans = [load(Plan, path) for path in args.plan]
    for plan in plans:
        check_world_size(plan.mesh, env_int("WORLD_SIZE"), "the launcher (WORLD_SIZE)", plan.ps_servers_dedicated)
        check_plan(plan)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = plans[0].spec.cluster.backend
    device = select_device(backend, env_int("LOCAL_RANK", 0))
    flush_denormals(device)
    timeout = timedelta(seconds=min(plan.collective_timeout_s for plan in plans))
    checkpoint = checkpoint_options(args)
    join_process_group(backend, timeout, device)
    for plan, path, out in zip(plans, args.plan, args.out):
        current[:] = [path]
        mesh = build_mesh(plan.mesh, device=device, timeout_s=plan.collective_timeout_s,
                          servers=plan.ps_servers_dedicated)
        train(plan, mesh, out, steps=args.steps, save_params=args.save_params, checkpoint=checkpoint,
              straggler=args.straggler)
        gc.collect()  # free this plan's DDP/FSDP state (held in reference cycles) while its groups still work
        dist.barrier()
    dist.destroy_process_group()


def is_peer_failure(exc: BaseException) -> bool:
    """A broken collective: another rank died or stalled (our own state is not the cause)."""
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, dist.DistError) or any(marker in text for marker in PEER_MARKERS)


def failure_record(exc: BaseException, rank: int, timeout_s: float | None, plan: str) -> dict[str, object]:
    """What the launcher needs to report this rank's failure."""
    peer = is_peer_failure(exc) and not isinstance(exc, TrainplanError)
    first_line = (str(exc).strip().splitlines() or [""])[0]
    if peer:
        message = (f"rank {rank}: a collective failed ({type(exc).__name__}: {first_line[:300]}); another rank "
                   f"probably died or stalled{f' (collective timeout {timeout_s:.0f} s)' if timeout_s else ''}")
    elif isinstance(exc, TrainplanError):
        message = f"rank {rank}: {exc}"
    else:
        message = f"rank {rank}: {type(exc).__name__}: {first_line}"
    return {"rank": rank, "time_ns": time.time_ns(), "kind": "peer" if peer else "error", "message": message,
            "plan": plan, "traceback": traceback.format_exc()}


def _write_failure(out: Path, record: dict[str, object]) -> None:
    folder = out / "failures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank-{record['rank']}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record))
    os.replace(path.with_suffix(".tmp"), path)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run one worker and exit: 0 on success, 1 on its own error, 2 when a peer broke a collective."""
    args = parse_args(argv)
    rank = env_int("RANK", 0)
    code = 0
    current = [args.plan[0]]
    try:
        run(args, current)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the process exits
        record = failure_record(exc, rank, _timeout_of(current[0]), str(current[0]))
        print(record["message"], file=sys.stderr)
        traceback.print_exc()
        try:
            _write_failure(args.run_dir, record)
        except OSError as write_error:
            print(f"rank {rank}: could not write the failure record: {write_error}", file=sys.stderr)
        code = 2 if record["kind"] == "peer" else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _timeout_of(plan_path: Path) -> float | None:
    try:
        return float(load(Plan, plan_path).collective_timeout_s)
    except Exception:  # noqa: BLE001 - only for the message; the plan may be what failed to load
        return None


if __name__ == "__main__":
    main()
