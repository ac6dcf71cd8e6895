"""Run one function in N local processes joined in a torch.distributed process group.

:func:`run_local_workers` starts ``nproc`` fresh Python processes (``sys.executable``) on this
host. Process ``rank`` imports the target, given as a ``'module:function'`` string, joins a
process group of ``nproc`` ranks and calls ``function(WorkerContext)``. Each call returns a
JSON-serialisable dict, and the parent returns those dicts ordered by rank.

* Rendezvous goes through a ``FileStore`` in a private temporary folder, not a TCPStore. torch's
  TCPStore server listens on every interface even when given 127.0.0.1, and a file needs no free
  port. Gloo and NCCL sockets are pinned to the loopback interface (``GLOO_SOCKET_IFNAME`` /
  ``NCCL_SOCKET_IFNAME``), because these processes never talk to another host.
* Devices: with ``backend='nccl'``, rank ``r`` uses ``cuda:r``, so the caller must check that
  ``nproc`` GPUs are visible. With ``'gloo'``, every rank uses the CPU. ``OMP_NUM_THREADS``,
  ``MKL_NUM_THREADS`` and ``torch.set_num_threads`` are set to ``threads`` in every worker.
* Deadlines: the process group has ``group_timeout_s``, so a collective whose peer has died
  fails instead of hanging. The parent also enforces ``timeout_s`` on the whole run.
* Errors: a worker that fails, or a deadline that passes, makes the parent kill every worker and
  raise :class:`WorkerError`. The message names the first rank that failed, how it exited and
  the tail of its traceback. No worker outlives the call, whatever happens.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainplan.errors import TrainplanError


class WorkerError(TrainplanError):
    """Local workers failed or missed the deadline.

    ``ranks``: when ``timed_out`` is false, the ranks that exited non-zero, with the first to fail
    listed first. When ``timed_out`` is true, the ranks that were still running at the deadline.
    ``rank`` is ``ranks[0]``, the rank the message is about.
    """

    def __init__(self, message: str, *, ranks: Sequence[int], timed_out: bool) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)
        self.timed_out = timed_out

    @property
    def rank(self) -> int:
        return self.ranks[0]


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """What a worker function receives: its rank in an already-initialised process group, the
    group size, its device (``cuda:rank`` on NCCL, the CPU on gloo), and the caller's ``config``."""

    rank: int
    world_size: int
    device: torch.device
    config: dict[str, Any]


def _loopback_interface() -> str | None:
    try:
        return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    except OSError:
        return None


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    lo = _loopback_interface()
    if lo:  # keep gloo/NCCL listening on loopback only: these processes never leave this host
        env.update(GLOO_SOCKET_IFNAME=lo, NCCL_SOCKET_IFNAME=lo)
    return env


def child_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of a worker process, called with ``<launch.json> <rank>``. On success it writes
    ``result<rank>.json`` to the launch folder and exits 0. On failure it writes a ``failed<rank>``
    timestamp, prints the traceback to stderr and exits 1."""
    launch_path, rank = (sys.argv[1:] if argv is None else argv)[:2]
    code = 0
    try:
        launch = json.loads(Path(launch_path).read_text())
        result = _run_child(launch, int(rank))
        out = Path(launch["folder"]) / f"result{rank}.json"
        out.with_suffix(".tmp").write_text(json.dumps(result))
        os.replace(out.with_suffix(".tmp"), out)
    except BaseException:  # noqa: BLE001 - the parent reads the traceback from our stderr
        # When, so the parent can tell the first failure from peers that lost their connection to it.
        with contextlib.suppress(OSError):
            (Path(launch_path).parent / f"failed{rank}").write_text(str(time.time_ns()))
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown, which can abort after a process group (TORCH-NOTES)


def _run_child(launch: dict[str, Any], rank: int) -> dict[str, Any]:
    torch.set_num_threads(launch["threads"])
    module, _, name = launch["target"].partition(":")
    target = getattr(importlib.import_module(module), name)
    cuda = launch["backend"] == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    world = launch["world_size"]
    store = dist.FileStore(launch["store"], world)
    dist.init_process_group(launch["backend"], store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=launch["group_timeout_s"]), device_id=device if cuda else None)
    result = target(WorkerContext(rank, world, device, launch["config"]))
    # Only on success: tearing the group down first would make the peers fail before our traceback
    # is written. After a failure, exiting closes the connections anyway.
    dist.destroy_process_group()
    return result


def _tail(path: Path, lines: int = 15) -> list[str]:
    text = path.read_text(errors="replace").rstrip() if path.exists() else ""
    return text.splitlines()[-lines:] or ["(no output)"]


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by signal {-code} (out of memory?)"
    return f"exited with code {code}"


def _failure(failed: list[int], codes: list[int | None], folder: Path, label: str) -> WorkerError:
    """The error for the first rank to fail (ordered by the time each rank recorded), with its
    traceback. The other failed ranks, usually peers that lost their connection to it, get one
    line each."""
    logs = {r: folder / f"err{r}.log" for r in failed}
    stamps = {r: folder / f"failed{r}" for r in failed}
    failed = sorted(failed, key=lambda r: int(stamps[r].read_text()) if stamps[r].exists() else 2**63)
    first, tail = failed[0], _tail(logs[failed[0]])
    lines = [f"{label} failed: worker rank {first} {_exit_text(codes[first])}: {tail[-1]}"]
    lines += ["    " + line for line in tail]
    lines += [f"then rank {r} {_exit_text(codes[r])}: {_tail(logs[r])[-1]}" for r in failed[1:]]
    return WorkerError("\n".join(lines), ranks=failed, timed_out=False)


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout_s: float, folder: Path, label: str,
              timeout_hint: str | None) -> None:
    """Return when every worker has exited 0. Raise :class:`WorkerError` at the first failure or
    at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            raise _failure(failed, codes, folder, label)
        if all(c == 0 for c in codes):
            return
        if time.monotonic() > deadline:
            running = [r for r, c in enumerate(codes) if c is None]
            tail = "\n".join("    " + line for line in _tail(folder / f"err{running[0]}.log"))
            raise WorkerError(
                f"{label} workers {running} did not finish within {timeout_s:.0f} s and were killed; "
                f"last output of rank {running[0]}:\n{tail}" + (f"\n{timeout_hint}" if timeout_hint else ""),
                ranks=running, timed_out=True)
        time.sleep(0.05)


def _kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def run_local_workers(target: str, nproc: int, *, backend: str, config: dict[str, Any], threads: int,
                      timeout_s: float, group_timeout_s: float = 60.0, label: str | None = None,
                      timeout_hint: str | None = None) -> list[dict[str, Any]]:
    """Run ``target`` in ``nproc`` fresh local processes joined in one process group, and return
    each process's result dict, ordered by rank.

    ``target``: a ``'module:function'`` string. Every worker imports it, so ``module`` must be
    importable with the parent's environment (its ``PYTHONPATH``). The function is called as
    ``function(WorkerContext) -> dict``, and the dict must be JSON-serialisable.
    ``backend``: ``'gloo'`` (CPU) or ``'nccl'`` (rank ``r`` on ``cuda:r``).
    ``config``: JSON-serialisable, passed to every worker unchanged as ``WorkerContext.config``.
    ``threads``: intra-op threads of each worker.
    ``timeout_s``: deadline of the whole run. ``group_timeout_s``: timeout of the process group's
    collectives.
    ``label``: how messages name the run (default: ``target``). ``timeout_hint``: a line added to
    the deadline message, such as how to fix it.

    Raises :class:`WorkerError` when a worker exits non-zero, naming the first rank that failed
    with its traceback, or when the deadline passes. In both cases every worker is killed first.
    No worker outlives this call.
    """
    label = target if label is None else label
    with tempfile.TemporaryDirectory(prefix="trainplan-workers-") as tmp:
        folder = Path(tmp)
        launch = {"target": target, "world_size": nproc, "backend": backend, "config": config,
                  "threads": threads, "store": str(folder / "store"), "folder": tmp,
                  "group_timeout_s": group_timeout_s}
        (folder / "launch.json").write_text(json.dumps(launch))
        code = "from trainplan.runtime.local_workers import child_main; child_main()"
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for rank in range(nproc):
                with open(folder / f"out{rank}.log", "wb") as out, open(folder / f"err{rank}.log", "wb") as err:
                    procs.append(subprocess.Popen([sys.executable, "-c", code, str(folder / "launch.json"), str(rank)],
                                                  stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                                  env=_child_env(threads), start_new_session=True))
            _wait_all(procs, timeout_s, folder, label, timeout_hint)
        finally:
            _kill_all(procs)
        return [json.loads((folder / f"result{r}.json").read_text()) for r in range(nproc)]
