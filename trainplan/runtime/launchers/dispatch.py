"""``trainplan launch PLAN --on local|slurm|kubernetes``: check the request, then run, submit or print.

* ``local``: start the plan's nodes as torchrun agents on this host and wait for them.
* ``slurm``: write ``OUT/launch.sbatch`` and submit it with ``sbatch`` (``--dry-run``: print it).
* ``kubernetes``: write ``OUT/pytorchjob.yaml`` (ConfigMap + PyTorchJob) and ``kubectl apply`` it
  (``--dry-run``: print it).

Every target first checks that ``--nodes`` (if given) is the plan's node count; a mismatch is a
:class:`~trainplan.runtime.launchers.request.DeviceCountError` saying how to re-plan.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, TextIO, get_args

from trainplan.ir.plan import Plan
from trainplan.runtime.launchers.command import Checkpointing, default_out_dir, free_port, worker_command
from trainplan.runtime.launchers.kubernetes import (
    DEFAULT_PORT,
    MANIFEST_NAME,
    apply_kubernetes,
    job_name,
    render_kubernetes,
)
from trainplan.runtime.launchers.local import LOOPBACK, launch_local, local_agents
from trainplan.runtime.launchers.request import (
    LaunchError,
    check_checkpoint_folder,
    check_checkpointing,
    check_max_restarts,
    check_request,
    load_plan,
)
from trainplan.runtime.launchers.slurm import SCRIPT_NAME, render_slurm, submit_slurm

Target = Literal["local", "slurm", "kubernetes"]
DEFAULT_TIME = "01:00:00"
SLURM_PORT = 29500


@dataclass(frozen=True, slots=True)
class SlurmOptions:
    """What only Slurm needs: the time limit, where to run and who pays, the rendezvous port."""

    time: str = DEFAULT_TIME
    partition: str | None = None
    account: str | None = None
    port: int = SLURM_PORT


@dataclass(frozen=True, slots=True)
class KubernetesOptions:
    """What only Kubernetes needs: the image, the namespace, an optional deadline, output volume and job name."""

    image: str | None = None
    namespace: str = "default"
    time: str | None = None
    port: int = DEFAULT_PORT
    output_claim: str | None = None
    name: str | None = None


def launch(plan_path: str | Path, on: Target, *, dry_run: bool = False, nodes: int | None = None,
           out_dir: str | Path | None = None, max_restarts: int = 0, python: str | None = None,
           command: Sequence[str] | None = None, slurm: SlurmOptions | None = None,
           kubernetes: KubernetesOptions | None = None, timeout_s: float | None = None,
           stdout: TextIO | None = None, checkpoint: Checkpointing | None = None) -> int:
    """Launch (or with ``dry_run`` print) the plan at ``plan_path`` on ``on``; the exit code.

    ``out_dir`` (default ``out/<spec name>/run``) receives the run's results (local, Slurm) and the
    script or manifests written; ``command`` replaces the per-rank program; ``timeout_s`` bounds
    a local run; ``checkpoint`` saves checkpoints and makes every restart resume from the newest
    complete one (:class:`~trainplan.runtime.launchers.command.Checkpointing`).
    """
    if on not in get_args(Target):
        raise LaunchError(f"--on must be one of {', '.join(get_args(Target))}, got {on!r}")
    plan = load_plan(plan_path)
    check_request(plan, nodes)
    job = _Launch(plan, Path(plan_path).resolve(), Path(out_dir or default_out_dir(plan.spec.name)).resolve(), dry_run,
                  nodes, check_max_restarts(max_restarts), python, None if command is None else list(command),
                  stdout or sys.stdout, check_checkpointing(checkpoint))
    if on == "local":
        return _local(job, timeout_s)
    if on == "slurm":
        return _slurm(job, slurm or SlurmOptions())
    return _kubernetes(job, kubernetes or KubernetesOptions())


@dataclass(frozen=True, slots=True)
class _Launch:
    """One launch request, checked against its plan."""

    plan: Plan
    plan_path: Path
    out: Path
    dry_run: bool
    nodes: int | None
    max_restarts: int
    python: str | None
    command: list[str] | None
    stdout: TextIO
    checkpoint: Checkpointing | None = None


def _local(job: _Launch, timeout_s: float | None) -> int:
    python = job.python or sys.executable
    if not job.dry_run:
        return launch_local(job.plan_path, nodes=job.nodes, out_dir=job.out, max_restarts=job.max_restarts,
                            command=job.command, timeout_s=timeout_s, python=python, checkpoint=job.checkpoint)
    shape = check_request(job.plan, job.nodes)
    checkpoint = job.checkpoint and replace(job.checkpoint,
                                            directory=str(Path(job.checkpoint.folder(str(job.out))).resolve()))
    rank_command = job.command or worker_command(str(job.plan_path), str(job.out), python=python, checkpoint=checkpoint)
    agents = local_agents(shape, rank_command, out_dir=job.out, port=free_port(LOOPBACK),
                          run_id="trainplan-dry-run", max_restarts=job.max_restarts, python=python)
    print(f"# {shape.nodes} torchrun agents on this host, {shape.nproc_per_node} workers each "
          "(a new free port and run id are chosen at launch)", file=job.stdout)
    for agent in agents:
        env = " ".join(f"{key}={shlex.quote(value)}" for key, value in agent.env.items())
        print(f"# node {agent.node}\n{env} {shlex.join(agent.argv)}", file=job.stdout)
    return 0


def _slurm(job: _Launch, options: SlurmOptions) -> int:
    script = render_slurm(job.plan, job.plan_path, out_dir=job.out, time=options.time, port=options.port,
                          partition=options.partition, account=options.account, max_restarts=job.max_restarts,
                          python=job.python or sys.executable, command=job.command, nodes=job.nodes,
                          checkpoint=job.checkpoint)
    if job.dry_run:
        print(script, end="", file=job.stdout)
        return 0
    if job.checkpoint is not None:  # the folder is on a shared file system, so it is visible from here too
        check_checkpoint_folder(job.plan, job.checkpoint, Path(job.checkpoint.folder(str(job.out))).resolve())
    job_id = submit_slurm(script, job.out)
    print(f"submitted Slurm job {job_id}: {job.out / SCRIPT_NAME}\n"
          f"Slurm's log: {job.out}/slurm-{job_id}.out; results: {job.out}", file=job.stdout)
    return 0


def _kubernetes(job: _Launch, options: KubernetesOptions) -> int:
    manifests = render_kubernetes(job.plan, job.plan_path, image=options.image or "", namespace=options.namespace,
                                  max_restarts=job.max_restarts, time=options.time, port=options.port,
                                  output_claim=options.output_claim, command=job.command, nodes=job.nodes,
                                  python=job.python or "python", name=options.name, checkpoint=job.checkpoint)
    if job.dry_run:
        print(manifests, end="", file=job.stdout)
        return 0
    applied = apply_kubernetes(manifests, job.out)
    print(f"{applied}\nwrote {job.out / MANIFEST_NAME}; follow the job with "
          f"`kubectl -n {options.namespace} logs -f {options.name or job_name(job.plan)}-master-0`", file=job.stdout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``trainplan launch``."""
    p = argparse.ArgumentParser(prog="trainplan launch",
                                description="Run a plan on this host, or submit it to Slurm or Kubernetes.")
    p.add_argument("plan", help="a plan.yaml written by `trainplan plan`")
    p.add_argument("--on", required=True, choices=get_args(Target), help="where to run it")
    p.add_argument("--dry-run", action="store_true", help="print the commands, script or manifests; start nothing")
    p.add_argument("--nodes", type=int,
                   help="nodes to use; must be the plan's (re-plan with `trainplan plan SPEC --nodes N`)")
    p.add_argument("--out", help="output folder (default: out/<spec name>/run); on a filesystem every node sees for Slurm")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="elastic restarts of the workers after a failure (default 0)")
    p.add_argument("--python", help="interpreter with trainplan installed (default: this one; 'python' in a container)")
    p.add_argument("--time", help=f"time limit, Slurm's forms (Slurm default {DEFAULT_TIME}; Kubernetes: none)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--port", type=int, help=f"rendezvous port (Slurm default {SLURM_PORT}, Kubernetes {DEFAULT_PORT})")
    p.add_argument("--image", help="Kubernetes: container image with trainplan and torch installed")
    p.add_argument("--namespace", default="default", help="Kubernetes namespace (default: default)")
    p.add_argument("--output-claim", help="Kubernetes: PersistentVolumeClaim to keep the results in")
    p.add_argument("--name", help="Kubernetes: the PyTorchJob's name (default: from the spec's name)")
    c = p.add_argument_group("checkpoints (every restart resumes from the newest complete one)")
    c.add_argument("--checkpoint-every", type=int, metavar="N", help="save a sharded checkpoint every N steps")
    c.add_argument("--checkpoint-minutes", type=float, metavar="M", help="also save when M minutes have passed")
    c.add_argument("--checkpoint-dir", metavar="DIR",
                   help="checkpoint folder (default OUT/ckpt; Kubernetes: /trainplan/out/ckpt on --output-claim); "
                   "on Slurm and Kubernetes it must be on storage every node sees")
    c.add_argument("--keep-checkpoints", type=int, default=3, metavar="K", help="complete checkpoints to keep (default 3)")
    c.add_argument("--checkpoint-async", action="store_true", help="write checkpoints while training continues")
    c.add_argument("--resume", action="store_true",
                   help="start from the newest complete checkpoint of the folder (without it a local or Slurm "
                   "launch refuses a folder that already holds checkpoints)")
    return p


def checkpointing_of(args: argparse.Namespace) -> Checkpointing | None:
    """The launch's checkpoint settings from its flags; None without any."""
    if not (args.checkpoint_every or args.checkpoint_minutes or args.resume or args.checkpoint_dir
            or args.checkpoint_async or args.keep_checkpoints != 3):
        return None
    return Checkpointing(every_steps=args.checkpoint_every, every_minutes=args.checkpoint_minutes,
                         directory=args.checkpoint_dir, keep=args.keep_checkpoints, asynchronous=args.checkpoint_async,
                         resume=args.resume)


def launch_main(argv: Sequence[str] | None = None) -> int:
    """``trainplan launch``: parse the flags and :func:`launch`. User mistakes raise TrainplanError."""
    args = build_parser().parse_args(argv)
    slurm = SlurmOptions(time=args.time or DEFAULT_TIME, partition=args.partition, account=args.account,
                         port=args.port or SLURM_PORT)
    kubernetes = KubernetesOptions(image=args.image, namespace=args.namespace, time=args.time,
                                   port=args.port or DEFAULT_PORT, output_claim=args.output_claim, name=args.name)
    return launch(args.plan, args.on, dry_run=args.dry_run, nodes=args.nodes, out_dir=args.out,
                  max_restarts=args.max_restarts, python=args.python, slurm=slurm, kubernetes=kubernetes,
                  checkpoint=checkpointing_of(args))
