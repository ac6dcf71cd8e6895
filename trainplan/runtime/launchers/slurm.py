"""Slurm: an sbatch script that starts one torchrun agent per node with ``srun``.

The script asks for the plan's nodes with one task each (``--ntasks-per-node=1``), GPUs per node
for NCCL plans and CPUs per task for gloo plans, checks that Slurm granted that many nodes, takes
the first host of the allocation as the rendezvous host, and runs :func:`torchrun_command` on
every node through ``srun``. The plan and the output folder must be on a filesystem every node
sees (as ``$HOME`` or a project share usually is), and ``python`` must be an interpreter with
trainplan installed on every node (the submitting one by default).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from trainplan.ir.plan import Plan
from trainplan.runtime.launchers.command import AGENT_ENV, Checkpointing, torchrun_command, worker_command
from trainplan.runtime.launchers.request import (
    LaunchError,
    check_checkpointing,
    check_max_restarts,
    check_port,
    check_request,
    time_limit_s,
)

SCRIPT_NAME = "launch.sbatch"
EXIT_WRONG_ALLOCATION = 2
# Placeholders replaced by shell expressions after quoting (they contain no character shlex quotes).
_NNODES = "TRAINPLAN_NNODES_PLACEHOLDER"
_HEAD = "TRAINPLAN_HEAD_PLACEHOLDER"
_JOB = "TRAINPLAN_JOB_PLACEHOLDER"
_SHELL = {_NNODES: '"$SLURM_NNODES"', _HEAD: '"$head_node"', _JOB: '"$SLURM_JOB_ID"'}


def render_slurm(plan: Plan, plan_path: str | Path, *, out_dir: str | Path, time: str = "01:00:00",
                 port: int = 29500, partition: str | None = None, account: str | None = None,
                 max_restarts: int = 0, python: str = "python", command: Sequence[str] | None = None,
                 nodes: int | None = None, checkpoint: Checkpointing | None = None) -> str:
    """The sbatch script that runs ``plan`` (stored at ``plan_path``) on the plan's nodes.

    ``out_dir`` receives the workers' results and Slurm's own log (``slurm-<job id>.out``);
    ``command`` replaces the per-rank program (default :func:`worker_command`); ``nodes``, when
    given, must be the plan's node count. ``checkpoint`` adds the checkpoint flags to the worker
    (its folder, default ``OUT/ckpt``, must be on a file system every node sees).
    """
    shape = check_request(plan, nodes)
    time_limit_s(time)
    check_port(port)
    plan_path, out = str(Path(plan_path).resolve()), str(Path(out_dir).resolve())
    checkpoint = check_checkpointing(checkpoint)
    if checkpoint is not None:
        if command is not None:
            raise LaunchError("checkpoint flags apply to trainplan's worker, not to a replaced per-rank command")
        checkpoint = replace(checkpoint, directory=str(Path(checkpoint.folder(out)).resolve()))
    rank_command = list(command) if command is not None else worker_command(plan_path, out, python=python,
                                                                               checkpoint=checkpoint)
    agent = torchrun_command(nnodes=_NNODES, nproc_per_node=shape.nproc_per_node, endpoint=f"{_HEAD}:{port}",
                             run_id=_JOB, rank_command=rank_command,
                             max_restarts=check_max_restarts(max_restarts), python=python)
    lines = ["#!/bin/bash", *_directives(plan, shape.nodes, shape.nproc_per_node, shape.gpus, time, out,
                                           partition, account), ""]
    lines += _body(plan, shape.nodes, shape.nproc_per_node, agent, checkpoint)
    return "\n".join(lines) + "\n"


def _directives(plan: Plan, nodes: int, nproc: int, gpus: bool, time: str, out: str,
                partition: str | None, account: str | None) -> list[str]:
    """The ``#SBATCH`` lines: one task (torchrun agent) per node, the node's GPUs or CPUs, the time limit."""
    _directive_value(out, "the output folder")
    for value, flag in ((partition, "--partition"), (account, "--account")):
        if value is not None:
            _directive_value(value, flag)
    lines = [f"--job-name={_job_name(plan.spec.name)}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    lines.append(f"--gpus-per-node={nproc}" if gpus else f"--cpus-per-task={nproc}")
    lines += [f"--time={time}", f"--output={out}/slurm-%j.out"]
    if partition:
        lines.append(f"--partition={partition}")
    if account:
        lines.append(f"--account={account}")
    return [f"#SBATCH {line}" for line in lines]


def _directive_value(value: str, what: str) -> str:
    """``value`` if it fits on an ``#SBATCH`` line (which has no quoting): no whitespace, quotes or ``#``."""
    if not value or re.search(r"[\s'\"#\\]", value):
        raise LaunchError(f"{what} {value!r} cannot go on an #SBATCH line: use a value without spaces, quotes or '#'")
    return value


def _checkpoint_comment(checkpoint: Checkpointing | None) -> list[str]:
    if checkpoint is None:
        return []
    when = " and ".join(part for part in (
        f"every {checkpoint.every_steps} steps" if checkpoint.every_steps else "",
        f"every {checkpoint.every_minutes:g} minutes" if checkpoint.every_minutes else "") if part) or "none new"
    return [
        f"# checkpoints ({when}, the last {checkpoint.keep} kept{', written asynchronously' * checkpoint.asynchronous}):",
        f"#   {checkpoint.directory}",
        "#   must be on a shared file system every node sees (each rank writes its own shards there; rank 0",
        "#   commits). A restart (--max-restarts) or a requeued job resumes from the newest complete checkpoint.",
    ]


def _body(plan: Plan, nodes: int, nproc: int, agent: list[str], checkpoint: Checkpointing | None = None) -> list[str]:
    mesh = plan.mesh
    what = "GPUs" if plan.spec.cluster.backend == "nccl" else "CPU processes"
    command = _continued(agent)
    return [
        f"# trainplan plan '{plan.spec.name}' (spec {plan.spec_hash[:12]}): mesh pp={mesh.pp} x dp={mesh.dp} "
        f"x tp={mesh.tp} on {nodes} nodes x {nproc} {what} ({plan.spec.cluster.backend})",
        *_checkpoint_comment(checkpoint),
        "set -euo pipefail",
        f'if [ "${{SLURM_NNODES:-0}}" -ne {nodes} ]; then',
        f'    echo "trainplan: the plan needs {nodes} nodes but the job has ${{SLURM_NNODES:-none}}; '
        f'submit it with --nodes={nodes}" >&2',
        f"    exit {EXIT_WRONG_ALLOCATION}",
        "fi",
        *[f"export {key}={value}" for key, value in AGENT_ENV.items()],
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        "",
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {command}",
    ]


def _continued(agent: list[str]) -> str:
    """The agent's command as shell words, one torchrun option per line, the per-rank command last."""
    split = agent.index("--no-python")
    head, options, rank = agent[:3], agent[3:split], agent[split:]
    lines = [shlex.join(head)] + [shlex.join(options[i:i + 2]) for i in range(0, len(options), 2)] + [shlex.join(rank)]
    text = " \\\n    ".join(lines)
    for placeholder, expression in _SHELL.items():
        text = text.replace(placeholder, expression)
    return text


def _job_name(name: str) -> str:
    return "trainplan-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run")


def submit_slurm(script: str, out_dir: str | Path) -> str:
    """Write ``script`` to ``OUT/launch.sbatch``, submit it with ``sbatch`` and return the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError("sbatch was not found on PATH: submit from a Slurm login node, or print the script "
                          "with --dry-run and submit it there")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / SCRIPT_NAME
    path.write_text(script)
    done = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = done.stderr.strip() or done.stdout.strip()
        raise LaunchError(f"sbatch refused {path} (exit {done.returncode}): {reason}")
    return done.stdout.strip().split(";")[0]
