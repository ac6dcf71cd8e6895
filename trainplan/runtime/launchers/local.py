"""Multi-node on one host: ``nodes`` torchrun agents meeting in a c10d rendezvous on loopback.

This is the code path of a real multi-node job — separate agents, a rendezvous hosted by the
first one, ranks assigned by the rendezvous — with every address pinned to 127.0.0.1 and a
free port chosen at launch, so a Slurm or Kubernetes layout can be tried on a laptop. Agent
``i``'s output goes to ``OUT/agents/node-<i>.log`` (node 0's to the terminal when ``console``).

With a GPU (NCCL) plan each agent sees only its own ``devices_per_node`` GPUs through
``CUDA_VISIBLE_DEVICES``, as on separate machines; the host must have ``nodes x
devices_per_node`` of them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from trainplan.runtime.launchers.command import (
    AGENT_ENV,
    Checkpointing,
    default_out_dir,
    torchrun_command,
    worker_command,
)
from trainplan.runtime.launchers.request import (
    LaunchError,
    Shape,
    check_checkpoint_folder,
    check_checkpointing,
    check_max_restarts,
    check_request,
    load_plan,
)
from trainplan.runtime.stores import LOOPBACK, loopback_rendezvous

STOP_GRACE_S = 30.0
"""How long an agent may take to stop its workers after SIGTERM before it is killed."""


@dataclass(frozen=True, slots=True)
class LocalAgent:
    """One node of a local launch: its torchrun command, the environment it adds, its log file."""

    node: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None


def local_agents(shape: Shape, rank_command: Sequence[str], *, out_dir: Path, port: int, run_id: str,
                 max_restarts: int = 0, python: str = sys.executable, host_node: int | None = 0) -> list[LocalAgent]:
    """The ``shape.nodes`` agents of a local launch, meeting at ``127.0.0.1:port``.

    ``host_node`` hosts the rendezvous store; ``None`` makes every agent a client of a store the
    caller already serves there (:func:`launch_local` does, bound to loopback only, because
    torch's own store listens on every interface).
    """
    env = {**AGENT_ENV, **_loopback_env()}
    gpus = _gpu_sets(shape) if shape.gpus else [None] * shape.nodes
    agents = []
    for node in range(shape.nodes):
        extra = ["--local-addr", LOOPBACK, "--rdzv-conf", f"is_host={int(node == host_node)}"]
        argv = torchrun_command(nnodes=shape.nodes, nproc_per_node=shape.nproc_per_node,
                                endpoint=f"{LOOPBACK}:{port}", run_id=run_id, rank_command=rank_command,
                                max_restarts=max_restarts, python=python, extra=extra)
        node_env = dict(env) if gpus[node] is None else {**env, "CUDA_VISIBLE_DEVICES": gpus[node]}
        agents.append(LocalAgent(node, argv, node_env, out_dir / "agents" / f"node-{node}.log"))
    return agents


def launch_local(plan_path: str | Path, *, nodes: int | None = None, nproc_per_node: int | None = None,
                 out_dir: str | Path | None = None, max_restarts: int = 0, command: Sequence[str] | None = None,
                 timeout_s: float | None = None, console: bool = True, python: str = sys.executable,
                 checkpoint: Checkpointing | None = None) -> int:
    """Run the plan as ``nodes`` local torchrun agents of ``nproc_per_node`` workers; 0 when all succeeded.

    ``nodes`` / ``nproc_per_node`` default to the plan's cluster and must match it
    (:class:`~trainplan.runtime.launchers.request.DeviceCountError` otherwise). ``command`` is what
    each rank runs (default :func:`worker_command`); ``timeout_s`` stops every agent after that
    many seconds and returns 124. ``checkpoint`` adds the checkpoint flags to the default worker
    (a restart, of either agent's workers, resumes from the newest complete checkpoint); its folder
    is checked first (:func:`~trainplan.runtime.launchers.request.check_checkpoint_folder`).
    """
    plan_path = Path(plan_path).resolve()
    plan = load_plan(plan_path)
    shape = check_request(plan, nodes, nproc_per_node)
    out = Path(out_dir or default_out_dir(plan.spec.name)).resolve()
    checkpoint = check_checkpointing(checkpoint)
    if checkpoint is not None:
        if command is not None:
            raise LaunchError("checkpoint flags apply to trainplan's worker, not to a replaced per-rank command")
        checkpoint = replace(checkpoint, directory=str(Path(checkpoint.folder(str(out))).resolve()))
        check_checkpoint_folder(plan, checkpoint, checkpoint.folder(str(out)))
    rank_command = list(command) if command is not None else worker_command(str(plan_path), str(out), python=python,
                                                                               checkpoint=checkpoint)
    max_restarts = check_max_restarts(max_restarts)
    shutil.rmtree(out / "agents", ignore_errors=True)  # a previous launch's logs, maybe of more nodes
    (out / "agents").mkdir(parents=True)
    with loopback_rendezvous() as endpoint:  # this process serves the rendezvous, on loopback only
        agents = local_agents(shape, rank_command, out_dir=out, port=int(endpoint.rsplit(":", 1)[1]),
                              run_id=f"trainplan-{uuid.uuid4().hex[:8]}", max_restarts=max_restarts,
                              python=python, host_node=None)
        return run_agents(agents, timeout_s=timeout_s, console=console)


def run_agents(agents: Sequence[LocalAgent], *, timeout_s: float | None = None, console: bool = True) -> int:
    """Start the agents (node 0 first), wait for all; stop the rest when one fails or time runs out."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []
    try:
        for agent in agents:
            to_console = console and agent.node == 0
            sink = None if to_console or agent.log is None else open(agent.log, "wb")  # noqa: SIM115
            if sink is not None:
                logs.append(sink)
            procs.append(subprocess.Popen(agent.argv, env={**os.environ, **agent.env}, stdout=sink,
                                          stderr=subprocess.STDOUT if sink else None, start_new_session=True))
        node, code = _wait(procs, None if timeout_s is None else time.monotonic() + timeout_s)
    finally:
        _stop(procs)
        for sink in logs:
            sink.close()
    if code != 0:
        print(_failure_text(agents, node, code, console, timeout_s), file=sys.stderr)
    return code


def _wait(procs: Sequence[subprocess.Popen[bytes]], deadline: float | None) -> tuple[int, int]:
    """``(node, exit code)`` of the first agent to fail, ``(-1, 0)`` when all succeed, ``(-1, 124)`` at the deadline."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(node, code) for node, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            return failed[0]
        if all(code == 0 for code in codes):
            return -1, 0
        if deadline is not None and time.monotonic() > deadline:
            return -1, 124
        time.sleep(0.1)


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every agent still running (it stops its workers), SIGKILL those that outlive the grace period."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        _signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
            proc.wait()


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _failure_text(agents: Sequence[LocalAgent], node: int, code: int, console: bool, timeout_s: float | None) -> str:
    if node < 0:
        return (f"local launch stopped after {timeout_s:g} s (timeout): the agents were still running; "
                f"their logs: {agents[0].log.parent if agents[0].log else 'above'}")
    agent = agents[node]
    lines = [f"local launch failed: node {node}'s torchrun agent exited with code {code}"]
    if agent.log is not None and not (console and node == 0) and agent.log.exists():
        tail = agent.log.read_text(errors="replace").rstrip().splitlines()[-20:]
        lines += [f"last lines of {agent.log}:"] + ["    " + line for line in tail]
    return "\n".join(lines)


def _loopback_env() -> dict[str, str]:
    """Pin gloo's and NCCL's sockets to the loopback interface: these agents never leave this host."""
    try:
        name = next((n for _, n in socket.if_nameindex() if n.startswith("lo")), None)
    except OSError:
        name = None
    return {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name} if name else {}


def _gpu_sets(shape: Shape) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each agent: consecutive groups of ``nproc_per_node`` of this host's GPUs."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in visible.split(",") if i.strip()] if visible else None
    count = len(ids) if ids is not None else torch.cuda.device_count()
    if count < shape.world_size:
        raise LaunchError(
            f"the plan uses NCCL on {shape.nodes} nodes x {shape.nproc_per_node} GPUs = {shape.world_size}, but this "
            f"host has {count} visible; a local launch puts every node on this host: launch on a cluster "
            "(--on slurm / --on kubernetes), or plan for a gloo cluster (cluster: {preset: cpu-local}) to run on CPUs"
        )
    ids = ids or [str(i) for i in range(count)]
    d = shape.nproc_per_node
    return [",".join(ids[n * d:(n + 1) * d]) for n in range(shape.nodes)]
