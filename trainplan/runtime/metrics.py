"""What a run writes: ``metrics.jsonl`` (one JSON object per step), ``summary.json`` and a progress line.

Per step: ``step`` (0-based), ``loss`` (mean over the global batch, nats), ``step_time_s`` (wall
seconds of the whole step on rank 0, optimizer included), ``tokens_per_s`` (global batch x tokens
per sample / step time; a sample of a classification task counts as one token),
``max_memory_bytes`` (peak over ranks so far: resident set size on CPU, CUDA max allocated on GPUs).

The summary compares the measured step time (median over the steps after the first, which pays
for warm-up; the only step when there is one) with the plan's estimate.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch


@dataclass(frozen=True, slots=True)
class StepMetrics:
    step: int
    loss: float
    step_time_s: float
    tokens_per_s: float
    max_memory_bytes: int
    wire_bytes: int | None = None  # data-parallel bytes sent by all ranks in the step (our hooks / modes)
    staleness_max: float | None = None  # parameter server: pushes applied between a worker's pull and its push
    staleness_mean: float | None = None


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory since the last reset: CUDA max allocated, or the peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak (each plan of a sweep reports its own): CUDA stats, or Linux's VmHWM via clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size (proc(5))
    except OSError:
        pass  # not Linux, or not permitted: the peak then covers the whole process


def timed_steps(values: list[Any], untimed: int = 1) -> list[Any]:
    """The steps whose time counts: those after the first ``untimed`` (the warm-up, and the steps whose
    memory the run samples with saved-tensor hooks, which slow them), when there are any; else all
    but the warm-up; else all."""
    return values[untimed:] or values[1:] or values


def measured_step_time(times: list[float], untimed: int = 1) -> float:
    """Median step time of :func:`timed_steps`."""
    return statistics.median(timed_steps(times, untimed))


class MetricsWriter:
    """Appends step metrics to ``out_dir/metrics.jsonl``, prints progress and writes the summary."""

    def __init__(self, out_dir: Path, total_steps: int, stream: TextIO | None = None, *, first_step: int = 0) -> None:
        """``first_step`` > 0 (a resumed run): keep the lines of the earlier steps, drop later ones."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.steps: list[StepMetrics] = _earlier_steps(out_dir / "metrics.jsonl", first_step)
        self._file = (out_dir / "metrics.jsonl").open("w")
        for kept in self.steps:
            self._file.write(json.dumps({k: v for k, v in asdict(kept).items() if v is not None}) + "\n")

    def record(self, metrics: StepMetrics) -> None:
        self.steps.append(metrics)
        self._file.write(json.dumps({k: v for k, v in asdict(metrics).items() if v is not None}) + "\n")
        self._file.flush()
        print(
            f"step {metrics.step + 1}/{self.total_steps}  loss {metrics.loss:.4f}  "
            f"{metrics.step_time_s:.3f} s/step  {metrics.tokens_per_s:,.0f} tokens/s",
            file=self.stream,
            flush=True,
        )

    def summary(self, *, layout: str, estimated_step_time_s: float | None, world_size: int,
                extra: dict[str, Any] | None = None, untimed_steps: int = 1) -> dict[str, Any]:
        """Write and return ``summary.json``; ``ratio`` = measured / estimated step time (None without an estimate).

        ``extra``: further sections (``memory`` and ``time`` from :mod:`trainplan.runtime.measure`).
        ``untimed_steps``: leading steps left out of the medians where later ones exist (:func:`timed_steps`).
        """
        times = [m.step_time_s for m in self.steps]
        measured = measured_step_time(times, untimed_steps)
        ratio = measured / estimated_step_time_s if estimated_step_time_s else None
        data = {
            "layout": layout,
            "world_size": world_size,
            "steps": len(self.steps),
            "final_loss": self.steps[-1].loss,
            "measured_step_time_s": measured,
            "estimated_step_time_s": estimated_step_time_s,
            "measured_over_estimated": ratio,
            "tokens_per_s": statistics.median(m.tokens_per_s for m in timed_steps(self.steps, untimed_steps)),
            "max_memory_bytes": max(m.max_memory_bytes for m in self.steps),
            **(extra or {}),
        }
        (self.out_dir / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
        return data

    def close(self) -> None:
        self._file.close()


def _earlier_steps(path: Path, first_step: int) -> list[StepMetrics]:
    """The recorded steps before ``first_step`` (those a resumed run does not repeat)."""
    if first_step <= 0 or not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = StepMetrics(**json.loads(line))
        except (ValueError, TypeError):
            continue  # a line cut short by the fault
        if record.step < first_step:
            kept.append(record)
    return kept


def layout_text(plan: Any) -> str:
    """The plan's layout in one line, e.g. ``dp=2 tp=2 pp=1 mb=2x2 gpipe zero=3 recompute=none fp32``."""
    allreduce = "" if plan.allreduce == "native" else f" allreduce={plan.allreduce}"
    allreduce += "" if plan.sync == "sync" else f" sync={plan.sync}"
    allreduce += "" if plan.compression == "none" else f" compression={plan.compression}"
    return (
        f"dp={plan.mesh.dp} tp={plan.mesh.tp} pp={plan.mesh.pp} mb={plan.micro_batch}x{plan.num_microbatches} "
        f"{plan.schedule}{f' v={plan.virtual_stages}' if plan.virtual_stages > 1 else ''} zero={plan.zero} "
        f"recompute={plan.recompute}{' sp' if plan.sequence_parallel else ''} {plan.spec.training.precision}"
        f"{allreduce}"
    )
