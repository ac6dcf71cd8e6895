"""The command every launcher runs on each node: one torchrun agent starting the plan's workers.

On every node, whatever the launcher (local processes, ``srun``, a Kubernetes pod)::

    python -m torch.distributed.run --nnodes N --nproc-per-node D \\
        --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB --max-restarts R \\
        --no-python <worker_command(plan, out)>

The agents meet in a c10d rendezvous hosted by the first node, form a world of ``N x D`` ranks and
start ``D`` copies of the per-rank command each, with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set. :func:`worker_command` is the one place that names that
per-rank program; tests and other entry points pass their own ``command`` to the launchers.

``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` is set for every agent (and so every worker): without it
the workers of a restarted attempt reuse the previous attempt's store and addresses, and elastic
restarts recovered in only 5 of 14 tries on gloo (10 of 10 with it; TORCH-NOTES).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

WORKER_MODULE = "trainplan.runtime.worker"
"""The per-rank entry point: reads the plan, joins the process group from torchrun's environment, trains."""

TORCHRUN_MODULE = "torch.distributed.run"
RDZV_BACKEND = "c10d"

AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
"""Environment of every torchrun agent and its workers (see the module docstring)."""


def default_out_dir(spec_name: str) -> Path:
    """Where a launch writes by default: ``out/<spec name>/run``, as ``trainplan run`` does."""
    return Path("out") / spec_name / "run"


@dataclass(frozen=True, slots=True)
class Checkpointing:
    """Checkpoints of a launched run (``trainplan launch --checkpoint-every N ...``), as worker flags.

    ``directory`` defaults to ``OUT/ckpt``; on Slurm and Kubernetes it must be on storage every node
    sees. Workers always get ``--resume-if-present``: whatever restarts them — torchrun after a
    failure (on any node: an agent that did not fail starts its workers again with restart count 0),
    a requeued Slurm job, a restarted pod — they continue from the newest complete checkpoint.
    ``resume`` requires one (``--resume``); without it a local or Slurm launch refuses a folder that
    already holds checkpoints (checked before starting).
    """

    every_steps: int | None = None
    every_minutes: float | None = None
    directory: str | None = None
    keep: int = 3
    asynchronous: bool = False
    resume: bool = False

    def folder(self, out_dir: str) -> str:
        return self.directory or f"{out_dir.rstrip('/')}/ckpt"

    def worker_args(self, out_dir: str) -> list[str]:
        """The flags of :mod:`trainplan.runtime.worker` that carry these settings (``out_dir`` as the worker sees it)."""
        args = ["--checkpoint-dir", self.folder(out_dir), "--keep-checkpoints", str(self.keep)]
        if self.every_steps:
            args += ["--checkpoint-every", str(self.every_steps)]
        if self.every_minutes:
            args += ["--checkpoint-minutes", repr(self.every_minutes)]
        args.append("--resume-if-present")
        if self.resume:
            args.append("--resume")
        if self.asynchronous:
            args.append("--checkpoint-async")
        return args


def worker_command(plan_path: str, out_dir: str, *, python: str = "python",
                   checkpoint: Checkpointing | None = None) -> list[str]:
    """The program each rank runs: the plan's worker, writing metrics, summary and failures to ``out_dir``."""
    command = [python, "-m", WORKER_MODULE, "--run-dir", out_dir, "--plan", plan_path, "--out", out_dir]
    return command + (checkpoint.worker_args(out_dir) if checkpoint is not None else [])


def torchrun_command(*, nnodes: int | str, nproc_per_node: int, endpoint: str, run_id: str,
                     rank_command: Sequence[str], max_restarts: int = 0, python: str = "python",
                     extra: Sequence[str] = ()) -> list[str]:
    """One node's torchrun agent: join the c10d rendezvous at ``endpoint`` and start ``rank_command`` per rank.

    ``nnodes`` and ``endpoint`` may be shell expressions (``$SLURM_NNODES``) when the caller renders
    a script; ``extra`` holds further torchrun options (``--local-addr``, ``--rdzv-conf``).
    """
    return [
        python, "-m", TORCHRUN_MODULE,
        "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
        "--rdzv-backend", RDZV_BACKEND, "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
        "--max-restarts", str(max_restarts),
        *extra,
        "--no-python", *rank_command,
    ]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (for a rendezvous started next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])

