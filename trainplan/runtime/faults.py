"""Fault injection for tests of recovery: ``TRAINPLAN_FAULT=kill:rank=1:step=3`` makes rank 1
SIGKILL itself before training step 3 (0-based), ``stop:...`` SIGSTOP itself (a hung rank),
``raise:...`` raise an error; only in the first attempt of an elastic run and once per output
folder, so a restarted run completes. The time of the fault is appended to ``OUT/faults.jsonl``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trainplan.runtime.checkpoint_store import FAULT_ENV, CheckpointError, append_jsonl


# ---------------------------------------------------------------------------------------------
# Fault injection (testing aid)


@dataclass(frozen=True)
class Fault:
    """``kind:rank=R:step=S``: rank ``R`` kills (SIGKILL) / stops (SIGSTOP) itself or raises before step ``S``."""

    kind: str
    rank: int
    step: int


def parse_fault(text: str) -> Fault:
    parts = text.split(":")
    kind, fields = parts[0], dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    if kind not in ("kill", "stop", "raise") or set(fields) != {"rank", "step"} or len(parts) != 3:
        raise CheckpointError(f"{FAULT_ENV}={text!r}: expected KIND:rank=R:step=S with KIND kill, stop or raise")
    try:
        return Fault(kind, int(fields["rank"]), int(fields["step"]))
    except ValueError:
        raise CheckpointError(f"{FAULT_ENV}={text!r}: rank and step must be integers") from None


def fault_from_env() -> Fault | None:
    """The fault of ``TRAINPLAN_FAULT``, only in the first attempt of an elastic run (restarts run clean)."""
    text = os.environ.get(FAULT_ENV)
    if not text or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    return parse_fault(text)


def inject_fault(fault: Fault | None, rank: int, step: int, out_dir: Path) -> None:
    """Carry out ``fault`` if it is this rank's and this step's; its time goes to ``out_dir/faults.jsonl``."""
    if fault is None or fault.rank != rank or fault.step != step or _fired(fault, out_dir):
        return
    append_jsonl(out_dir / "faults.jsonl", {"kind": fault.kind, "rank": rank, "step": step, "time_ns": time.time_ns()})
    sys.stdout.flush()
    sys.stderr.flush()
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        raise RuntimeError(f"injected fault ({FAULT_ENV}) on rank {rank} before step {step}")


def _fired(fault: Fault, out_dir: Path) -> bool:
    """Whether ``fault`` already happened in this run (``faults.jsonl``).

    With several torchrun agents only the agent whose worker failed counts a restart: the workers
    of the other nodes start the next round with ``TORCHELASTIC_RESTART_COUNT=0``, and the rank
    that carries the fault may have moved to one of them.
    """
    path = out_dir / "faults.jsonl"
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if (record.get("kind"), record.get("rank"), record.get("step")) == (fault.kind, fault.rank, fault.step):
            return True
    return False
