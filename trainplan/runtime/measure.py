"""Measured memory and time of each rank, next to the plan's estimate for that rank's stage.

A :class:`Meter` attaches to a :class:`~trainplan.runtime.train.Trainer` (it wraps the trainer's
micro-batch phase and optimizer step on the instance; nothing else changes) and records, per step:

Memory is sampled in the first :data:`MEMORY_SAMPLE_STEPS` steps (shapes are static, so later steps
repeat them), times in every step; the time medians leave those steps out where later ones exist
(the saved-tensor hooks run Python for every tensor saved for backward and slow a step: 62 against
42 ms for a 4-layer GPT at dp=4 on a 2-core CPU). Memory, in bytes, each counted once per storage (a tensor and its views share one), from the
tensors this rank holds — the local block of a DTensor, FSDP2's padded shard, the partition of
``ZeroRedundancyOptimizer`` — in the planner's terms (:mod:`trainplan.planner.cost.memory`,
``MemoryBreakdown`` in :mod:`trainplan.ir.plan`):

* ``params``: the parameters the forward computes with. ZeRO 0/1/3: the parameters the optimizer
  updates (whole, or ZeRO-3's shards). ZeRO-2 (FSDP2 ``reshard_after_forward=False``): the
  gathered parameters held from forward to backward, the peak over the ends of the micro-batches'
  forwards; the persistent shards are the optimizer's master copy and count under ``optimizer``.
* ``grads``: the gradients after the last backward of a step, before the optimizer step.
* ``optimizer``: the optimizer's state tensors (0-dim step counters excluded), plus the master
  copy at ZeRO-2.
* ``activations``: the peak bytes saved for backward by the autograd graph across the micro-batches
  in flight, seen through :func:`torch.autograd.graph.saved_tensors_hooks` (unique storages,
  parameters and views of parameters excluded), plus the outputs ``recompute: selective`` caches
  in forward (the checkpoint holds those outside the hooks; the policy reports them,
  :func:`trainplan.runtime.recompute.observe_saved_outputs`, until backward reaches the block).
  Tensors a recomputed region saves again during backward are not seen (the checkpoint's own
  hooks hold them), nor the checkpoint's stored inputs.
* ``gathered_params`` (ZeRO-3): parameters FSDP2 all-gathered and still held at the end of a
  micro-batch's forward (FSDP2 keeps the root module's gathered after forward); no estimate.
* ``comm_buffers``: DDP's gradient buckets (``_get_ddp_logging_data()["bucket_sizes"]``); no estimate.
* on CUDA, ``cuda_max_allocated`` / ``cuda_max_reserved`` (``torch.cuda.max_memory_*``), compared
  with the estimate's total without the reserved overhead and with it.

In bf16/fp16 the runtime keeps fp32 parameters and gradients and casts under autocast, while the
planner counts 16-bit parameters and gradients and fp32 master weights in the optimizer (ZeRO's
``2 + 2 + K``): the components then differ by design and only ``model_states`` (their sum)
is compared.

Time, in seconds per step: ``forward`` and ``backward`` (wall time inside this rank's stage
forwards and backwards: ``PipelineStage.forward_one_chunk`` / ``backward_one_chunk`` in a pipeline;
the stage module's forward hooks and the rest of each micro-batch's forward-backward otherwise),
``dp_sync`` (exposed gradient synchronisation without a pipeline and with two or more
micro-batches: the last micro-batch's backward, which synchronises, minus the mean of the others,
which do not), ``bubble`` (pipelines: the micro-batch phase minus the busy time), ``optimizer``
(the optimizer step, tied-gradient sums included). Estimates: ``num_microbatches`` times the
stage's ``fwd_time_s`` / ``bwd_time_s``, ``plan.estimate.comm_time_s.dp`` and
``bubble_fraction`` times the estimated step time, each with the part of the exposed
data-parallel time that its timer holds (:func:`time_comparison`).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from trainplan.runtime.metrics import timed_steps
from trainplan.runtime.recompute import observe_saved_outputs

WARN_OVER = 0.10  # warn when a measurement exceeds its estimate by more than this fraction
# Memory is sampled in the first steps only: with static shapes every step after the first holds the
# same tensors (the first has no optimizer state yet), so three steps see every peak, and the hooks'
# Python work (~8% of a small CPU model's step) is not paid for the rest of the run. Times are
# taken every step.
MEMORY_SAMPLE_STEPS = 3
MODEL_STATES = ("params", "grads", "optimizer")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t  # the DTensor's block on this rank


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(storage address, storage bytes) of a tensor's memory; None for a tensor without storage (meta, freed)."""
    local = _local(t)
    if local.device.type == "meta":
        return None
    try:
        storage = local.untyped_storage()
        nbytes = storage.nbytes()
        return (storage.data_ptr(), nbytes) if nbytes else None
    except (RuntimeError, NotImplementedError):  # a subclass without real storage (e.g. a functional wrapper)
        return None


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and aliases once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        key = storage_key(t)
        if key is not None:
            seen[key[0]] = key[1]
    return sum(seen.values())


def _is_parameter(t: torch.Tensor) -> bool:
    base = t._base if t._base is not None else t
    return isinstance(base, nn.Parameter) or isinstance(t, nn.Parameter)


class _Held:
    """What a saved-tensor pack hook returns: the tensor (detached, see :meth:`SavedTensorTracker.pack`),
    released from the count when autograd frees it."""

    __slots__ = ("tensor", "key", "tracker")

    def __init__(self, tensor: torch.Tensor, key: Any, tracker: "SavedTensorTracker") -> None:
        self.tensor, self.key, self.tracker = tensor, key, tracker

    def __del__(self) -> None:
        self.tracker.release(self.key)


class SavedTensorTracker:
    """Live and peak bytes of the distinct storages the autograd graph saved for backward."""

    def __init__(self) -> None:
        self.counts: dict[Any, int] = {}  # storage (or data slice) -> saved tensors holding it
        self.sizes: dict[Any, int] = {}
        self.live = 0
        self.peak = 0

    def pack(self, t: torch.Tensor) -> Any:
        """Count ``t``'s storage; return what autograd stores instead of ``t``.

        What is returned holds ``t.detach()`` (same storage and version counter, no ``grad_fn``),
        never ``t``: a pack result that references its input forms a reference cycle (saved output
        -> its ``grad_fn`` -> the pack result -> the output) that runs through C++ autograd nodes,
        which Python's garbage collector cannot see, so a graph never backpropagated is never freed
        (warning in :class:`torch.autograd.graph.saved_tensors_hooks`: "use ``lambda x: x.detach()``
        instead of ``lambda x: x``"). Such a graph exists: ``PipelineStage``'s metadata inference
        runs a grad-enabled forward of micro-batch 0 on the first step, and on the first stage,
        whose inputs (token ids) need no gradient, ``torch.autograd.grad`` is never called on it
        (``_backward_metadata_inference`` / ``_autograd_grad_for_inputs`` in
        ``torch/distributed/pipelining``); a cycle kept ~0.7 of a micro-batch alive and counted
        for the rest of the run.
        """
        key = storage_key(t)
        if key is None or _is_parameter(t):
            return t.detach()
        ptr, nbytes = key
        if t.grad_fn is None and not t.requires_grad:
            # Data fed to the model (token ids, images): the runtime cuts each micro-batch as a view of
            # the replica's batch, which the trainer holds anyway; what the micro-batch adds is its own
            # rows, and two micro-batches in flight are two such slices of one storage.
            ptr, nbytes = (ptr, t.storage_offset()), min(nbytes, t.numel() * t.element_size())
        count = self.counts.get(ptr, 0)
        self.counts[ptr] = count + 1
        if count == 0:
            self.sizes[ptr] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return _Held(t.detach(), ptr, self)

    @staticmethod
    def unpack(held: Any) -> torch.Tensor:
        return held.tensor if isinstance(held, _Held) else held

    def release(self, ptr: Any) -> None:
        count = self.counts.get(ptr, 0) - 1
        if count > 0:
            self.counts[ptr] = count
            return
        self.counts.pop(ptr, None)
        self.live -= self.sizes.pop(ptr, 0)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        # Also the outputs selective recomputation caches (they bypass the saved-tensor hooks).
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack), observe_saved_outputs(self.pack):
            yield


PERTURB_ENV = "TRAINPLAN_TEST_PERTURB_GRAD_RANK"


def perturb_gradient_for_test(rank: int, params: list[torch.Tensor]) -> None:
    """Test aid, off unless the environment variable ``TRAINPLAN_TEST_PERTURB_GRAD_RANK`` names this
    rank: add 1e-2 to each of this rank's gradients before every optimizer step (all of them, so the
    part of the optimizer this rank owns under ZeRO sees it too) — a deliberately wrong parallel
    run for the tests of ``trainplan verify``, which must then fail."""
    import os

    if os.environ.get(PERTURB_ENV) != str(rank):
        return
    for p in params:
        if p.grad is not None:
            _local(p.grad).add_(1e-2)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's optimizer state tensors (ZeroRedundancyOptimizer: its local partition's), 0-dim counters excluded."""
    inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    return [v for state in inner.state.values() for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0]


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter the optimizer updates (all of them for ZeroRedundancyOptimizer, which broadcasts)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def ddp_bucket_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of DDP's gradient buckets (its logging data lists each bucket's size in bytes)."""
    total = 0
    for module in modules:
        if isinstance(module, DistributedDataParallel):
            sizes = str(module._get_ddp_logging_data().get("bucket_sizes", ""))
            total += sum(int(s) for s in sizes.replace(" ", "").split(",") if s.isdigit())
    return total


@dataclass
class StepTimes:
    forward: float = 0.0
    backward: float = 0.0
    micro: float = 0.0
    optimizer: float = 0.0
    step: float = 0.0  # the whole step: micro-batches, update and the per-step all-gather (0: not timed)
    backward_per_micro: list[float] = field(default_factory=list)


class Meter:
    """Measures one rank's memory components and step phases while a Trainer runs (see module docstring)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.rank_model = trainer.rank_model
        self.plan = trainer.plan
        self.tracker = SavedTensorTracker()
        self.peak: dict[str, int] = {}
        self.steps: list[StepTimes] = []
        self._current = StepTimes()
        self._runner = getattr(trainer._micro, "runner", None)
        self._fwd_start = 0.0
        self._last_forward_end: float | None = None
        self._wrap_trainer()
        self._hooks = self._install_hooks()

    # ------------------------------------------------------------------ wiring
    def _wrap_trainer(self) -> None:
        micro, opt_step, whole = self.trainer._micro, self.trainer._optimizer_step, self.trainer.step_with_memory

        def measured_micro(inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> list[float]:
            self._current, self._last_forward_end = StepTimes(), None
            start = time.perf_counter()
            with self.tracker.track() if self.sampling else contextlib.nullcontext():
                losses = micro(inputs, targets)
            end = time.perf_counter()
            self._current.micro = end - start
            if self._last_forward_end is not None:  # without a pipeline: the last micro-batch's backward
                self._current.backward_per_micro.append(end - self._last_forward_end)
            self._after_backward()
            return losses

        def measured_step() -> None:
            perturb_gradient_for_test(self.trainer.mesh.rank, self._persistent())
            start = time.perf_counter()
            opt_step()
            self._current.optimizer = time.perf_counter() - start
            self._after_step()

        def measured_whole(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
            start = time.perf_counter()
            out = whole(inputs, targets)
            if self.steps:  # measured_step appended this step's record before the all-gather
                self.steps[-1].step = time.perf_counter() - start
            return out

        self.trainer._micro, self.trainer._optimizer_step = measured_micro, measured_step
        self.trainer.step_with_memory = measured_whole

    def _install_hooks(self) -> list[Any]:
        if self._runner is not None:
            for stage in self._runner.stages:
                stage.forward_one_chunk = self._timed(stage.forward_one_chunk, "forward")
                stage.backward_one_chunk = self._timed(stage.backward_one_chunk, "backward")
        handles = []
        for module in self.rank_model.inner.values():
            handles.append(module.register_forward_pre_hook(self._forward_start))
            handles.append(module.register_forward_hook(self._forward_end))
        return handles

    def _timed(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                setattr(self._current, phase, getattr(self._current, phase) + elapsed)

        return timed

    def _forward_start(self, module: nn.Module, args: Any) -> None:
        now = time.perf_counter()
        self._fwd_start = now
        if self._runner is None and self._last_forward_end is not None:
            self._current.backward_per_micro.append(now - self._last_forward_end)

    def _forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        now = time.perf_counter()
        if self._runner is None:
            self._current.forward += now - self._fwd_start
            self._last_forward_end = now
        self._sample_gathered()

    # ------------------------------------------------------------------ memory samples
    def _persistent(self) -> list[torch.Tensor]:
        return optimizer_params(self.rank_model.optimizer)

    def _sample_gathered(self) -> None:
        """Parameters registered on the modules now that are not the optimizer's (FSDP2's gathered copies)."""
        if self.plan.zero not in (2, 3) or not self.sampling:
            return
        own = {id(p) for p in self._persistent()}
        gathered = [p for p in self.rank_model.parameters() if id(p) not in own]
        self._max("gathered_sample", unique_bytes(gathered))

    def _max(self, name: str, value: int) -> None:
        self.peak[name] = max(self.peak.get(name, 0), int(value))

    @property
    def sampling(self) -> bool:
        """Whether this step's memory is measured (the first :data:`MEMORY_SAMPLE_STEPS` steps)."""
        return len(self.steps) < MEMORY_SAMPLE_STEPS

    def _after_backward(self) -> None:
        if not self.sampling:
            return
        grads = [p.grad for p in self._persistent() if p.grad is not None]
        self._max("grads", unique_bytes(grads))
        self._max("activations", self.tracker.peak)
        self.tracker.peak = self.tracker.live
        self._max("comm_buffers", ddp_bucket_bytes(self.rank_model.modules.values()))

    def _after_step(self) -> None:
        if not self.sampling:
            self.steps.append(self._current)
            return
        persistent = unique_bytes(self._persistent())
        state = unique_bytes(optimizer_state_tensors(self.rank_model.optimizer))
        if self.plan.zero == 2:
            self._max("params", self.peak.get("gathered_sample", 0))
            self._max("optimizer", state + persistent)
        else:
            self._max("params", persistent)
            self._max("optimizer", state)
            if self.plan.zero == 3:
                self._max("gathered_params", self.peak.get("gathered_sample", 0))
        device = self.trainer.mesh.device
        if device.type == "cuda":
            self._max("cuda_max_allocated", torch.cuda.max_memory_allocated(device))
            self._max("cuda_max_reserved", torch.cuda.max_memory_reserved(device))
        self.steps.append(self._current)

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()

    # ------------------------------------------------------------------ results
    def rank_record(self) -> dict[str, Any]:
        """This rank's measurements: memory peaks and median step phases (:func:`~trainplan.runtime.metrics.timed_steps`)."""
        device = self.trainer.mesh.device
        if device.type == "cuda":  # torch's running peaks cover the whole run, not only the sampled steps
            self._max("cuda_max_allocated", torch.cuda.max_memory_allocated(device))
            self._max("cuda_max_reserved", torch.cuda.max_memory_reserved(device))
        memory = {k: v for k, v in self.peak.items() if k != "gathered_sample"}
        memory["model_states"] = sum(memory.get(k, 0) for k in MODEL_STATES)
        steps = timed_steps(self.steps, MEMORY_SAMPLE_STEPS)
        mesh = self.trainer.mesh
        return {"rank": mesh.rank, "pp": mesh.pp_rank, "dp": mesh.dp_rank, "tp": mesh.tp_rank,
                "memory": memory, "time": _median_times(steps, self._runner is not None, self.plan.num_microbatches)}


def _exposed_sync(steps: list[StepTimes], pipelined: bool, m: int) -> float | None:
    """The last micro-batch's backward (which synchronises) minus the mean of the others (which do not)."""
    if pipelined or m < 2:
        return None
    values = []
    for s in steps:
        b = s.backward_per_micro
        if len(b) == m:
            values.append(max(0.0, b[-1] - statistics.fmean(b[:-1])))
    return statistics.median(values) if values else None


def _median_times(steps: list[StepTimes], pipelined: bool, m: int) -> dict[str, float | None]:
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    forward = med([s.forward for s in steps])
    if pipelined:
        backward = med([s.backward for s in steps])
        bubble = med([max(0.0, s.micro - s.forward - s.backward) for s in steps])
    else:
        backward = med([max(0.0, s.micro - s.forward) for s in steps])
        bubble = None
    timed = [s for s in steps if s.step > 0]
    update = med([max(0.0, s.step - s.micro) for s in timed]) if timed else None
    return {"forward": forward, "backward": backward, "bubble": bubble, "dp_sync": _exposed_sync(steps, pipelined, m),
            "optimizer": med([s.optimizer for s in steps]), "update": update, "micro_phase": med([s.micro for s in steps])}


# ---------------------------------------------------------------------- measured next to estimated


def gather_records(record: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's record on rank 0 (ordered by rank), None elsewhere; a collective over the world group."""
    records: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(record, records, dst=0)
    return sorted(records, key=lambda r: r["rank"]) if records is not None else None


def _compare(measured: float | None, estimated: float | None) -> dict[str, float | None]:
    error = (measured - estimated) / estimated if measured is not None and estimated else None
    return {"measured": measured, "estimated": estimated, "rel_error": error}


def _stage_estimates(plan: Any, pp_rank: int) -> tuple[Any, list[Any]]:
    """The plan's first stage of pipeline rank ``pp_rank`` (its memory is the rank's) and all its chunks."""
    chunks = sorted((s for s in plan.stages if s.index % plan.mesh.pp == pp_rank), key=lambda s: s.index)
    return chunks[0], chunks


def memory_comparison(plan: Any, record: dict[str, Any]) -> dict[str, Any]:
    """One rank's measured memory components next to its stage's ``memory_breakdown``."""
    stage, _ = _stage_estimates(plan, record["pp"])
    est = stage.memory_breakdown
    measured = record["memory"]
    estimates: dict[str, float | None] = {
        "params": est.params, "grads": est.grads, "optimizer": est.optimizer,
        "model_states": est.params + est.grads + est.optimizer, "activations": est.activations,
        "gathered_params": None, "comm_buffers": None,
    }
    if "cuda_max_allocated" in measured:
        estimates["cuda_max_allocated"] = stage.memory_bytes - plan.spec.cluster.device.memory_reserved
        estimates["cuda_max_reserved"] = stage.memory_bytes
    components = {name: _compare(measured.get(name), value) for name, value in estimates.items()
                  if name in measured}
    return {"rank": record["rank"], "stage": stage.index, "components": components}


def sync_in_backward(plan: Any) -> bool:
    """Whether the runtime's backward timer holds the data-parallel gradient sync. Without a pipeline
    the sync runs in the last micro-batch's backward (DDP's bucket all-reduces, FSDP2's
    reduce-scatter hooks), which the backward phase (the micro-batches less their forwards) spans; in
    a pipeline DDP reduces inside the last backward chunk (``PipelineStage.backward_maybe_with_nosync``)
    while FSDP2 (ZeRO 2/3) reduces after the schedule, in what the bubble measures."""
    return plan.mesh.pp == 1 or plan.zero in (0, 1)


def time_comparison(plan: Any, record: dict[str, Any]) -> dict[str, Any]:
    """One rank's measured step phases next to its stage's ``fwd_time_s``/``bwd_time_s`` (times the
    micro-batches), ``comm_time_s.dp``, ``bubble_fraction`` times the estimated step time, and
    ``update_time_s`` (what the step spends after its micro-batches: the optimizer update and the
    per-step all-gather; ``optimizer`` is the update alone, measured only).

    The exposed data-parallel time (``comm_time_s.dp``) is added to the estimate of the phase whose
    timer holds each part of it, so that each phase is compared with what it measures: FSDP2's
    parameter all-gathers to the forward (``dp_in_forward``) and ZeRO-3's re-gathers to the backward
    (``dp_in_backward``), ZeRO-1's parameter broadcast to the update (``dp_in_update``), and the
    gradient sync proper (the rest) to ``dp_sync`` and to the backward or the bubble
    (:func:`sync_in_backward`)."""
    _, chunks = _stage_estimates(plan, record["pp"])
    m = plan.num_microbatches
    measured = record["time"]
    step = plan.estimate.step_time_s
    comm = plan.estimate.comm_time_s
    sync = max(0.0, comm.dp - comm.dp_in_forward - comm.dp_in_backward - comm.dp_in_update)
    in_backward = sync_in_backward(plan)
    bubble_est = plan.estimate.bubble_fraction * step + (0.0 if in_backward else sync) if plan.mesh.pp > 1 else None
    update = measured.get("update")
    phases = {
        "forward": _compare(measured["forward"], m * sum(c.fwd_time_s for c in chunks) + comm.dp_in_forward),
        "backward": _compare(measured["backward"], m * sum(c.bwd_time_s for c in chunks) + comm.dp_in_backward
                             + (sync if in_backward else 0.0)),
        "dp_sync": _compare(measured["dp_sync"], sync if measured["dp_sync"] is not None else None),
        "bubble": _compare(measured["bubble"], bubble_est),
        "optimizer": _compare(measured["optimizer"], None),
        "update": _compare(update, plan.estimate.update_time_s + comm.dp_in_update if update is not None else None),
    }
    return {"rank": record["rank"], "stage": chunks[0].index, "phases": phases}


def warnings_for(plan: Any, memory: list[dict[str, Any]]) -> list[str]:
    """A line per rank and component whose measurement exceeds its estimate by more than 10%.

    In bf16/fp16 only the model states' sum is judged (the runtime splits them differently, see above).
    """
    mixed = plan.spec.training.precision != "fp32"
    skip = set(MODEL_STATES) if mixed else {"model_states"}
    lines = []
    for row in memory:
        for name, c in row["components"].items():
            if name in skip or c["rel_error"] is None or c["rel_error"] <= WARN_OVER:
                continue
            lines.append(f"rank {row['rank']} (stage {row['stage']}): measured {name} {_mib(c['measured'])} exceeds "
                         f"the estimate {_mib(c['estimated'])} by {100 * c['rel_error']:.0f}%")
    return lines


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3f} MiB"


def summary_sections(plan: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``memory`` and ``time`` sections of ``summary.json``: per rank, measured next to estimated."""
    memory = [memory_comparison(plan, r) for r in records]
    return {
        "memory": {"ranks": memory, "warnings": warnings_for(plan, memory)},
        "time": {"ranks": [time_comparison(plan, r) for r in records]},
    }


def finish(meter: Meter, plan: Any, stream: Any = None) -> dict[str, Any] | None:
    """Gather every rank's measurements (a collective: call on every rank); on rank 0 print the
    warnings and return the ``memory``/``time`` sections for ``summary.json``, None elsewhere."""
    meter.close()
    records = gather_records(meter.rank_record())
    if records is None:
        return None
    sections = summary_sections(plan, records)
    for line in sections["memory"]["warnings"]:
        print(f"warning: {line}", file=stream, flush=True)
    return sections
