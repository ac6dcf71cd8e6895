"""Run a plan on this host: ``launch(plan, nproc=N, out_dir=D)`` starts N local worker processes.

The workers are started and watched by torch's elastic agent — torchrun's machinery, with a
single attempt (no restarts) and a c10d rendezvous on a free local port. Every worker runs
:mod:`trainplan.runtime.worker`; rank 0's progress line is shown, every rank's output is kept in
``D/logs``. When a worker fails the agent stops the others at once, and the launcher names the
rank that failed first (from the workers' failure records: a rank whose own code failed, or that
died without a word, comes before ranks whose collectives broke because of it) with its reason,
in the returned error text, on stderr and in ``D/error.txt``.

``run_reference`` (what ``--nproc 1`` means) is the plain single-process run of the same spec.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from trainplan.ir.loading import dump_yaml
from trainplan.ir.plan import Plan
from trainplan.runtime.checkpoint import CheckpointOptions, check_checkpoint_dir, worker_args
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.mesh import check_world_size
from trainplan.runtime.parallelize import check_plan
from trainplan.runtime.stores import loopback_rendezvous
from trainplan.runtime.train import run_reference

__all__ = ["launch", "launch_sweep", "run_reference", "failure_summary"]

SHARE_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def default_threads(nproc: int) -> int:
    """Intra-op threads per worker: the usable cores shared evenly, at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // nproc)


def _prepare(out: Path, plan: Plan, resume: bool = False) -> Path:
    """A clean output folder holding the plan the workers read (a resumed run keeps its metrics)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("failures", "logs", "params"):
        shutil.rmtree(out / stale, ignore_errors=True)
    for stale in ("summary.json", "error.txt") + (() if resume else ("metrics.jsonl", "faults.jsonl", "resumes.jsonl")):
        (out / stale).unlink(missing_ok=True)
    path = out / "plan.yaml"
    path.write_text(dump_yaml(plan))
    return path


def launch(plan: Plan, *, nproc: int, out_dir: str | Path, steps: int | None = None,
           save_params: bool = False, threads: int | None = None, checkpoint: CheckpointOptions | None = None,
           max_restarts: int = 0, straggler: tuple[int, float] | None = None) -> int:
    """Run ``plan`` with ``nproc`` local workers; 0 when every worker succeeded, 1 otherwise.

    Refuses (:class:`~trainplan.runtime.errors.WorldSizeError`) a plan whose mesh needs another
    number of processes, and a layout the runtime cannot execute, before starting anything.
    ``out_dir`` receives ``plan.yaml``, ``metrics.jsonl``, ``summary.json``, ``logs/`` and, on
    failure, ``error.txt``; ``save_params`` also writes the final parameters to ``params/``.
    ``checkpoint`` saves / resumes checkpoints (:mod:`~trainplan.runtime.checkpoint`); the resume
    folder is checked here, before any worker starts. ``max_restarts`` > 0 restarts the whole group
    up to that many times after a worker fails; a restarted group resumes from the newest checkpoint.
    """
    if checkpoint is not None:
        check_checkpoint_dir(checkpoint, plan)
    return launch_sweep([plan], nproc=nproc, out_dirs=[out_dir], run_dir=out_dir, steps=steps,
                        save_params=save_params, threads=threads, max_restarts=max_restarts,
                        worker_args=[*(worker_args(checkpoint) if checkpoint else ()), *straggler_args(straggler, nproc)],
                        resume=bool(checkpoint and checkpoint.resume))


def straggler_args(straggler: tuple[int, float] | None, nproc: int) -> list[str]:
    """Worker arguments of the straggler experiment: delay one rank by some seconds every step."""
    if straggler is None:
        return []
    rank, seconds = straggler
    if not 0 <= rank < nproc:
        raise PlanExecutionError(f"--straggler {rank}:{seconds:g}: rank {rank} does not exist among {nproc} processes")
    return ["--straggler", f"{rank}:{seconds!r}"]


def launch_sweep(plans: Sequence[Plan], *, nproc: int, out_dirs: Sequence[str | Path], run_dir: str | Path,
                 steps: int | None = None, save_params: bool = False, threads: int | None = None,
                 max_restarts: int = 0, worker_args: Sequence[str] = (), resume: bool = False) -> int:
    """Run several plans for the same world size one after the other in one set of workers.

    Each plan writes its results to its ``out_dirs`` entry; the workers' logs, failure records and
    ``error.txt`` go to ``run_dir``. Starting processes and a process group once, rather than per
    plan, is what makes comparing many layouts on one machine quick.
    """
    if len(plans) != len(out_dirs) or not plans:
        raise ValueError(f"expected one output folder per plan, got {len(plans)} plans and {len(out_dirs)} folders")
    for plan in plans:
        check_world_size(plan.mesh, nproc, f"--nproc {nproc}", plan.ps_servers_dedicated)
        check_plan(plan)
    run = Path(run_dir).resolve()
    outs = [Path(d).resolve() for d in out_dirs]
    args = ["-m", "trainplan.runtime.worker", "--run-dir", str(run), "--threads", str(threads or default_threads(nproc))]
    for plan, out in zip(plans, outs):
        args += ["--plan", str(_prepare(out, plan, resume)), "--out", str(out)]
    _prepare_run_dir(run)
    if steps is not None:
        args += ["--steps", str(steps)]
    if save_params:
        args.append("--save-params")
    args += list(worker_args)
    with loopback_rendezvous() as endpoint:  # the agent's store listens on 127.0.0.1 only (trainplan.runtime.stores)
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"trainplan-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d", rdzv_endpoint=endpoint, max_restarts=max_restarts, monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=str(run / "logs"), redirects=Std.ALL, tee={0: Std.OUT}),
        )
        try:
            with _restart_env(max_restarts), _wake_stopped_workers(run / "failures"):
                elastic_launch(config, sys.executable)(*args)
        except ChildFailedError as exc:
            servers = {r for plan in plans for r in range(plan.mesh.world_size, plan.world_size)}
            message = failure_summary(run, {rank: f.exitcode for rank, f in exc.failures.items()}, nproc, servers)
            (run / "error.txt").write_text(message + "\n")
            print(message, file=sys.stderr)
            return 1
    return 0


@contextlib.contextmanager
def _restart_env(max_restarts: int) -> Iterator[None]:
    """With restarts, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for the agent and its workers.

    Without it a restarted gloo group reuses the previous attempt's addresses and often fails to
    form (5 of 14 recovered vs 10 of 10 with it; TORCH-NOTES).
    """
    if max_restarts == 0:
        yield
        return
    old = os.environ.get(SHARE_STORE_ENV)
    os.environ[SHARE_STORE_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SHARE_STORE_ENV, None)
        else:
            os.environ[SHARE_STORE_ENV] = old


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` (from Linux's /proc; empty elsewhere)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == parent:  # fields after "(comm)": state, ppid, ...
            pids.append(int(stat.parent.name))
    return pids


@contextlib.contextmanager
def _wake_stopped_workers(failures: Path, poll_s: float = 0.2) -> Iterator[None]:
    """Once a worker has recorded a failure, send SIGCONT to every worker, again and again.

    A stopped (SIGSTOP-ed, hung in the kernel's eyes) worker cannot act on the SIGTERM the agent
    sends the group after a failure: the signal waits until the process continues, and the agent
    waits 30 s before its SIGKILL. Continuing it lets the SIGTERM land at once, so a stopped rank
    costs the collective timeout, not the timeout plus 30 s. SIGCONT does nothing to a running process.
    """
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            if failures.is_dir() and any(failures.iterdir()):
                for pid in child_pids(os.getpid()):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGCONT)

    thread = threading.Thread(target=watch, name="trainplan-wake-stopped", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _prepare_run_dir(run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    for stale in ("failures", "logs"):
        shutil.rmtree(run / stale, ignore_errors=True)
    (run / "error.txt").unlink(missing_ok=True)


def _records(out: Path) -> dict[int, dict[str, object]]:
    records = {}
    for path in sorted((out / "failures").glob("rank-*.json")):
        record = json.loads(path.read_text())
        records[int(record["rank"])] = record
    return records


def failure_summary(out: Path, exit_codes: dict[int, int], world_size: int, servers: set[int] = frozenset()) -> str:
    """Which rank failed first and why, then one line per other failed rank (``servers``: ranks that
    are dedicated parameter servers, named as such).

    Order: ranks whose own code raised (earliest first), then ranks that died without writing a
    record (killed, out of memory, a crash in native code), then ranks whose collectives broke.
    When only broken collectives were seen, the ranks that had neither failed nor written a record
    when the run was stopped are named: they are the ones that stalled.
    """
    records = _records(out)
    # The agent stops the survivors of a failure with SIGTERM: without a record, such a rank was still running.
    stopped = {r for r, code in exit_codes.items() if code == -signal.SIGTERM and r not in records}
    ranks = sorted((set(records) | set(exit_codes)) - stopped)
    running = [r for r in range(world_size) if r not in ranks]
    own = sorted((r for r in ranks if records.get(r, {}).get("kind") == "error"), key=lambda r: records[r]["time_ns"])
    silent = [r for r in ranks if r not in records]
    peers = sorted((r for r in ranks if records.get(r, {}).get("kind") == "peer"), key=lambda r: records[r]["time_ns"])
    ordered = own + silent + peers
    lines = [f"run failed: {_describe(ordered[0], records, exit_codes, servers)}"] if ordered else ["run failed"]
    if ordered and ordered[0] in records and records[ordered[0]].get("plan"):
        lines.append(f"    (while running {records[ordered[0]]['plan']})")
    if ordered and ordered[0] in records:
        lines += ["    " + line for line in str(records[ordered[0]]["traceback"]).rstrip().splitlines()[-12:]]
    lines += [f"then {_describe(r, records, exit_codes, servers)}" for r in ordered[1:]]
    if running and not own and not silent:
        lines.append(f"rank{'s' if len(running) > 1 else ''} {', '.join(map(str, running))} "
                     f"{'were' if len(running) > 1 else 'was'} still running when the run was stopped: "
                     "stalled (a hang, a deadlock, or far slower than the others)?")
    lines.append(f"logs of every rank: {out / 'logs'}")
    return "\n".join(lines)


def _describe(rank: int, records: dict[int, dict[str, object]], exit_codes: dict[int, int],
              servers: set[int] = frozenset()) -> str:
    who = f"rank {rank} (a dedicated parameter server)" if rank in servers else f"rank {rank}"
    if rank in records:
        message = str(records[rank]["message"])
        return who + message[len(f"rank {rank}"):] if message.startswith(f"rank {rank}:") else message
    code = exit_codes.get(rank)
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
    return f"{who} {how} without reporting an error (killed, out of memory, or a crash in native code)"
