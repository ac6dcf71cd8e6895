"""Sharded checkpoints of a run, resume (also under another plan), and fault injection for tests.

A checkpoint ``DIR/step-000123/`` holds everything needed to continue after 123 completed steps:

* the model's parameters and buffers and the optimizer's state (Adam's ``exp_avg``, ``exp_avg_sq``
  and ``step``), written with ``torch.distributed.checkpoint`` (DCP): each rank writes what it
  holds — a whole tensor, or its block of a DTensor (tensor parallel, FSDP2, both) — keyed by the
  parameter's fully-qualified name in the *whole* model (``layers.2.attn.q.weight``, optimizer
  state under ``optim.<name>.<key>``). The pipeline stages keep whole-model names
  (:mod:`~trainplan.runtime.stages`), so the keys do not depend on the layout and DCP reshards on
  load: a checkpoint written under dp=4 loads under dp=2 x tp=2, one written under pp=2 under pp=1;
* every rank's RNG state (``rng.rank<r>``), restored when the mesh is the same;
* ``plan.yaml`` (the plan it was written under) and ``manifest.json``: the step, the spec's hash,
  the hash of the parts of the spec that must not change across a resume (model, task, seed,
  global batch, optimizer), the fp16 loss scaler's state, and the sha256 and size of every file.

The data position is the step: step ``s`` trains on ``synthetic_batch(task, global_batch, seed,
s)`` (:mod:`~trainplan.runtime.data`).

**Complete or absent.** Ranks write into ``step-000123.tmp/``; after DCP's own commit (every rank
has written its shard and rank 0 the ``.metadata``) and a barrier, rank 0 writes the manifest with
the checksums, fsyncs it, and renames the folder to ``step-000123/`` — an atomic rename on POSIX
file systems. Only then are checkpoints beyond the last ``keep`` removed, so a fault never loses
a completed checkpoint. Loading verifies the manifest and every checksum; a corrupt or truncated
checkpoint is reported and skipped, and the previous complete one is used.

**Never unpickles arbitrary objects.** Tensors are read by DCP's ``FileSystemReader`` with
``torch.load(weights_only=True)``; DCP's ``.metadata`` file is a pickle, which is read here by an
unpickler that accepts only DCP's metadata classes, ``torch.Size``, dtypes and builtin containers.
The manifest is JSON and the plan is read with ``yaml.safe_load``.

Why not ``get_state_dict``/``set_state_dict``: they take one module, but an interleaved pipeline
rank trains several stage modules with one optimizer, and they do not cover
``ZeroRedundancyOptimizer``; the state dict built here is the same thing (the parameters as the
rank holds them, optimizer state by parameter name) for every layout the runtime runs.

The on-disk side (manifest, checksums, the atomic commit, finding the latest complete checkpoint,
DCP's metadata read safely) is :mod:`~trainplan.runtime.checkpoint_store`; fault injection is
:mod:`~trainplan.runtime.faults`; this module builds the state and saves and loads it in a run, and
re-exports both.

**Fault injection** (a testing aid): ``TRAINPLAN_FAULT=kill:rank=1:step=3`` makes rank 1 SIGKILL
itself before training step 3 (0-based), ``stop:...`` SIGSTOP itself (a hung rank), ``raise:...``
raise an error; only in the first attempt of an elastic run and once per output folder, so a
restarted run completes. The time
of the fault is appended to ``OUT/faults.jsonl``, and the first step after each resume to
``OUT/resumes.jsonl``, from which the recovery time (fault → first step after resume) is measured.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from trainplan.ir.plan import Plan
from trainplan.runtime.checkpoint_store import (  # noqa: F401 - the on-disk API, re-exported for callers and tests
    FORMAT,
    IDENTITY_FIELDS,
    MANIFEST,
    PLAN_FILE,
    STEP_PREFIX,
    CheckpointError,
    Found,
    SafeFileSystemReader,
    append_jsonl,
    check_identity,
    check_resume_dir,
    commit,
    complete_checkpoints,
    find_latest,
    identity,
    identity_hash,
    manifest_of,
    read_manifest,
    recover_interrupted,
    refuse_stale,
    sha256_file,
    step_name,
    step_of,
    verify,
)
from trainplan.runtime.faults import Fault, fault_from_env, inject_fault, parse_fault  # noqa: F401 - re-exported


def check_checkpoint_dir(options: "CheckpointOptions", plan: Plan) -> Found | None:
    """Before a launch: what ``--resume`` will load (clear errors for bad input), or a fresh run's folder is free."""
    if plan.sync != "sync":
        raise CheckpointError(f"checkpoints are taken in synchronous runs only (sync: sync); this plan has sync: {plan.sync}")
    if options.resume:
        found = check_resume_dir(options.directory, plan.spec)
        print(f"resuming from {found.path} (step {found.step})", flush=True)
        return found
    refuse_stale(options.directory)
    return None


def worker_args(options: "CheckpointOptions") -> list[str]:
    """The worker command-line flags (:mod:`~trainplan.runtime.worker`) that carry ``options``."""
    args = ["--checkpoint-dir", str(options.directory.resolve()), "--keep-checkpoints", str(options.keep)]
    if options.every_steps:
        args += ["--checkpoint-every", str(options.every_steps)]
    if options.every_minutes:
        args += ["--checkpoint-minutes", str(options.every_minutes)]
    if options.resume:
        args.append("--resume")
    if options.resume_if_present:
        args.append("--resume-if-present")
    if options.asynchronous:
        args.append("--checkpoint-async")
    return args




# ---------------------------------------------------------------------------------------------
# What is saved: state by whole-model names


def _base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the state (ZeRO-1 keeps this rank's partition in ``.optim``)."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def named_parameters(stages: dict[int, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """Every (name, parameter) of this rank's stages, tied names included (``lm_head.weight`` and ``wte.weight``)."""
    return [(name, param) for _, module in sorted(stages.items())
            for name, param in module.named_parameters(remove_duplicate=False)]


def model_state(stages: dict[int, nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters and buffers as this rank holds them (DTensors stay DTensors), by whole-model name."""
    state: dict[str, torch.Tensor] = {}
    for _, module in sorted(stages.items()):
        for name, param in module.named_parameters(remove_duplicate=False):
            state[f"model.{name}"] = param.detach()
        for name, buffer in module.named_buffers(remove_duplicate=False):
            state[f"model.{name}"] = buffer
    return state


def optimizer_state(stages: dict[int, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's tensors by parameter name: ``optim.<name>.<key>``, under every name of a tied parameter."""
    base = _base_optimizer(optimizer)
    state: dict[str, torch.Tensor] = {}
    for name, param in named_parameters(stages):
        for key, value in base.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                state[f"optim.{name}.{key}"] = value
    return state


@torch.no_grad()
def contiguous_view(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[tuple[DTensor, DTensor]]]:
    """``state`` with every DTensor that has a ``_StridedShard`` placement replaced by a copy sharded
    contiguously on the same dimension; also the (original, copy) pairs.

    DCP records a rank's part of a DTensor as one block (offsets and sizes); the ``qkv``
    tensor-parallel style's strided shard (this rank's columns of q, of k and of v) is not one
    block, and DCP refuses its overlapping "blocks". The copy (a redistribution over the tp ranks)
    holds the same global tensor, so the checkpoint does not depend on the style; after a load,
    :func:`copy_back` puts the loaded values into the originals.
    """
    out, pairs = dict(state), []
    for key, value in state.items():
        if isinstance(value, DTensor) and any(isinstance(p, _StridedShard) for p in value.placements):
            placements = [Shard(p.dim) if isinstance(p, _StridedShard) else p for p in value.placements]
            out[key] = value.redistribute(value.device_mesh, placements)
            pairs.append((value, out[key]))
    return out, pairs


@torch.no_grad()
def copy_back(pairs: list[tuple[DTensor, DTensor]]) -> None:
    """Write each loaded contiguous copy into its strided original (see :func:`contiguous_view`)."""
    for original, copy in pairs:
        original.to_local().copy_(copy.redistribute(original.device_mesh, original.placements).to_local())


@torch.no_grad()
def create_optimizer_state(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer its state tensors (zeros) so a checkpoint can be loaded into them.

    One step with zero gradients and a learning rate of 0 — the parameters do not change (Adam's
    update and AdamW's decay are multiplied by ``lr``) and the state is then overwritten by the
    load. Every rank of a ZeRO-1 group must call it (its step broadcasts parameters).
    """
    groups = optimizer.param_groups
    saved_lr = [group["lr"] for group in groups]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(groups, saved_lr):
        group["lr"] = lr
    for p, grad in zip(params, grads):
        p.grad = grad


def rng_state(device: torch.device) -> torch.Tensor:
    state = torch.get_rng_state()
    if device.type == "cuda":
        state = torch.cat([state, torch.cuda.get_rng_state(device)])
    return state


def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    cpu = torch.get_rng_state()
    torch.set_rng_state(state[: cpu.numel()].clone())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[cpu.numel():].clone(), device)


# ---------------------------------------------------------------------------------------------
# Saving and loading in a run


@dataclass(frozen=True)
class CheckpointOptions:
    """When and where a run checkpoints, and whether it starts from one."""

    directory: Path
    every_steps: int | None = None
    every_minutes: float | None = None
    keep: int = 3
    resume: bool = False
    """Start from the newest complete checkpoint of ``directory`` (an error when there is none)."""
    resume_if_present: bool = False
    """Start from the newest complete checkpoint when there is one (an elastic restart, a requeued job)."""
    asynchronous: bool = False
    """Write the shards in the background (``dcp.async_save``) while training continues; commit when all are written."""

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise CheckpointError(f"keep: expected at least 1 checkpoint to keep, got {self.keep}")


@dataclass
class Restored:
    step: int
    folder: Path
    load_s: float
    same_mesh: bool
    notes: list[str] = field(default_factory=list)


class Checkpointer:
    """Saves this rank's part of the run every N steps / M minutes and restores it at the start.

    ``stages``: this rank's (unwrapped) stage modules, names as in the whole model; every rank of
    the run must call :meth:`restore`, :meth:`after_step` and :meth:`finish` at the same points.
    """

    def __init__(self, options: CheckpointOptions, plan: Plan, rank: int, device: torch.device,
                 stages: dict[int, nn.Module], optimizer: torch.optim.Optimizer, scaler: Any, out_dir: Path) -> None:
        self.options, self.plan, self.rank, self.device = options, plan, rank, device
        self.stages, self.optimizer, self.scaler, self.out_dir = stages, optimizer, scaler, out_dir
        self.directory = options.directory
        self._last_save = time.monotonic()
        self._resumed: Restored | None = None
        self._pending: _Pending | None = None
        self.save_times: list[float] = []
        """Seconds the training loop waited for each save (asynchronous: the copy and the start of the write)."""
        self.blocked_s = 0.0
        """Seconds the training loop spent in the checkpointer's step hooks and :meth:`finish` (saves, commits)."""
        # Asynchronous saves run DCP's collectives in a background thread: on a gloo group of their own,
        # created here by every rank at the same point, with the plan's collective timeout.
        self._group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=plan.collective_timeout_s))
                       if options.asynchronous else None)

    @classmethod
    def of(cls, options: CheckpointOptions, plan: Plan, mesh: Any, trainer: Any, out_dir: Path) -> "Checkpointer":
        """The checkpointer of a :class:`~trainplan.runtime.train.Trainer` on ``mesh`` (a ``RankMesh``)."""
        rank_model = trainer.rank_model
        return cls(options, plan, mesh.rank, mesh.device, rank_model.inner, rank_model.optimizer, trainer.scaler, out_dir)

    # -- restore -------------------------------------------------------------------------------

    def restore(self) -> int:
        """Load the newest complete checkpoint if asked to; the step to continue from (0: none)."""
        opts = self.options
        if not (opts.resume or opts.resume_if_present):
            if self.rank == 0:
                refuse_stale(self.directory)
            return 0
        chosen = self._choose()
        if chosen is None:
            if opts.resume:
                raise CheckpointError(f"--resume {self.directory}: no complete checkpoint to resume from "
                                      "(see rank 0's warnings)")
            return 0
        self._resumed = self._load(chosen)
        if self.rank == 0:
            note = "; ".join(self._resumed.notes)
            print(f"resumed from {chosen} (step {self._resumed.step}) in {self._resumed.load_s:.2f} s"
                  + (f"; {note}" if note else ""), flush=True)
        return self._resumed.step

    def _choose(self) -> Path | None:
        """Rank 0 verifies the checksums and picks a folder; every rank gets its step (-1: none)."""
        step = -1
        if self.rank == 0:
            found = find_latest(self.directory, self.plan.spec)
            step = -1 if found is None else found.step
        choice = torch.tensor([step], dtype=torch.int64, device=self.device)
        dist.broadcast(choice, src=0)
        step = int(choice)
        return None if step < 0 else self.directory / step_name(step)

    def _load(self, folder: Path) -> Restored:
        start = time.perf_counter()
        manifest = read_manifest(folder)
        check_identity(manifest, folder, self.plan.spec)
        same_mesh = manifest.get("mesh") == self.plan.mesh.model_dump(mode="json")
        params = [p for _, p in named_parameters(self.stages)]
        unique = list({id(p): p for p in params}.values())
        create_optimizer_state(unique, self.optimizer)
        state, strided = contiguous_view({**model_state(self.stages), **optimizer_state(self.stages, self.optimizer)})
        rng_key = f"rng.rank{self.rank}"
        if same_mesh:
            state[rng_key] = rng_state(self.device)
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(folder))
            copy_back(strided)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - DCP wraps per-rank errors; the first line says what
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{folder}: could not load into this plan's model ({first[:400]})") from None
        if same_mesh:
            set_rng_state(state[rng_key], self.device)
        if self.scaler is not None and manifest.get("scaler"):
            self.scaler.scale = float(manifest["scaler"]["scale"])
            self.scaler._clean_steps = int(manifest["scaler"]["clean_steps"])
        notes = self._differences(manifest, same_mesh)
        return Restored(int(manifest["step"]), folder, time.perf_counter() - start, same_mesh, notes)

    def _differences(self, manifest: dict[str, Any], same_mesh: bool) -> list[str]:
        notes = []
        if not same_mesh:
            old = manifest.get("mesh", {})
            notes.append(f"resharded from pp={old.get('pp')} dp={old.get('dp')} tp={old.get('tp')} to "
                         f"pp={self.plan.mesh.pp} dp={self.plan.mesh.dp} tp={self.plan.mesh.tp} "
                         "(RNG streams restart: dropout masks differ from an uninterrupted run)")
        old_training = (manifest.get("training") or {})
        new_training = self.plan.spec.training.model_dump(mode="json")
        for key in ("lr", "betas", "weight_decay", "precision"):
            if key in old_training and old_training[key] != new_training[key]:
                notes.append(f"training.{key} changed from {old_training[key]} to {new_training[key]}")
        return notes

    # -- save ----------------------------------------------------------------------------------

    def after_step(self, completed: int) -> None:
        """Called by every rank after ``completed`` steps: record a resume's first step, commit a finished
        background save, save when due."""
        start = time.perf_counter()
        if self._resumed is not None and completed == self._resumed.step + 1 and self.rank == 0:
            append_jsonl(self.out_dir / "resumes.jsonl", {
                "time_ns": time.time_ns(), "from_step": self._resumed.step, "checkpoint": self._resumed.folder.name,
                "load_s": self._resumed.load_s, "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                "resharded": not self._resumed.same_mesh})
        if self._pending is not None and self._all_written():
            self._complete_pending()
        if self._due(completed):
            self.save(completed)
        self.blocked_s += time.perf_counter() - start

    def finish(self) -> None:
        """Called by every rank at the end of the run: wait for a background save and commit it."""
        start = time.perf_counter()
        if self._pending is not None:
            self._complete_pending()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None
        self.blocked_s += time.perf_counter() - start
        if self.rank == 0 and self.save_times:
            append_jsonl(self.out_dir / "checkpoints.jsonl",
                          {"finish": True, "saves": len(self.save_times), "blocked_s": self.blocked_s,
                           "asynchronous": self.options.asynchronous})

    def _due(self, completed: int) -> bool:
        opts = self.options
        by_steps = bool(opts.every_steps) and completed % opts.every_steps == 0
        if not opts.every_minutes:
            return by_steps
        late = time.monotonic() - self._last_save >= 60 * opts.every_minutes
        flag = torch.tensor([1 if late else 0], dtype=torch.int64, device=self.device)
        dist.broadcast(flag, src=0)  # rank 0's clock decides, so every rank saves at the same step
        return by_steps or bool(int(flag))

    def save(self, completed: int) -> Path:
        """Write the checkpoint of ``completed`` steps; complete (renamed) or absent.

        Synchronous: returns after the commit. Asynchronous: returns once this rank's state is copied
        and its background write started; the commit follows when every rank's write has finished
        (:meth:`after_step` checks at each step, the next save and :meth:`finish` wait).
        """
        start = time.perf_counter()
        if self._pending is not None:  # one save in flight at a time: finish and commit the previous one
            self._complete_pending()
        final = self.directory / step_name(completed)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state, _ = contiguous_view({**model_state(self.stages), **optimizer_state(self.stages, self.optimizer)})
        state[f"rng.rank{self.rank}"] = rng_state(self.device)
        scaler = None
        if self.scaler is not None and self.scaler.enabled:
            scaler = {"scale": self.scaler.scale, "clean_steps": self.scaler._clean_steps}
        writer = FileSystemWriter(tmp, sync_files=True)
        if not self.options.asynchronous:
            dcp.save(state, storage_writer=writer)
            self._commit(_Pending(None, completed, tmp, final, scaler, start))
            return final
        # The state is copied to CPU memory before async_save returns (FileSystemWriter stages it), so
        # training may change the parameters at once; the writing and DCP's own collectives run in a
        # background thread on a process group of their own (never concurrently with the training's).
        if self._group is None:
            raise CheckpointError("asynchronous checkpoints need the checkpoint process group (create the "
                                  "Checkpointer on every rank)")
        future = dcp.async_save(state, storage_writer=writer, process_group=self._group)
        upload = getattr(future, "upload_completion", future)  # an AsyncSaveResponse when staging is itself async
        self._pending = _Pending(upload, completed, tmp, final, scaler, start)
        self._last_save = time.monotonic()
        self.save_times.append(time.perf_counter() - start)
        self._pending.blocking_s = self.save_times[-1]
        return final

    def _all_written(self) -> bool:
        """Whether every rank's background write is done (a MIN all-reduce, so every rank decides alike)."""
        if self._pending is None or self._pending.future is None:
            raise RuntimeError("internal error: no asynchronous checkpoint write is pending")
        flag = torch.tensor([1 if self._pending.future.done() else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(int(flag))

    def _complete_pending(self) -> None:
        """Wait for this rank's background write (re-raising its error), then commit on every rank."""
        pending, self._pending = self._pending, None
        if pending is None or pending.future is None:
            raise RuntimeError("internal error: no asynchronous checkpoint write is pending")
        try:
            pending.future.result()
        except Exception as exc:  # noqa: BLE001 - DCP gathers every rank's write error; say which checkpoint
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"writing checkpoint {pending.tmp} failed ({first[:400]}); it was not "
                                  "committed") from exc
        self._commit(pending)

    def _commit(self, pending: "_Pending") -> None:
        """After every rank wrote its shards: rank 0 writes the manifest and renames; then prunes."""
        dist.barrier()
        if self.rank == 0:
            commit(pending.tmp, pending.final, self.plan, pending.completed, pending.scaler)
            self._prune(pending.completed)
        dist.barrier()
        written_s = time.perf_counter() - pending.start
        if not self.options.asynchronous:
            self._last_save = time.monotonic()
            self.save_times.append(written_s)
        if self.rank == 0:
            record: dict[str, Any] = {"step": pending.completed, "path": str(pending.final), "save_s": written_s}
            if pending.future is not None:  # save_s: the loop's wait; committed_after_s: start of the save -> commit
                record.update(save_s=pending.blocking_s, asynchronous=True, committed_after_s=written_s)
            append_jsonl(self.out_dir / "checkpoints.jsonl", record)

    def _prune(self, completed: int) -> None:
        """Keep the newest ``keep`` complete checkpoints (never the one just written)."""
        for folder in complete_checkpoints(self.directory)[self.options.keep:]:
            if step_of(folder) != completed:
                shutil.rmtree(folder, ignore_errors=True)


@dataclass
class _Pending:
    """A checkpoint whose shards are being written (``future``: the background write; None when synchronous)."""

    future: Any
    completed: int
    tmp: Path
    final: Path
    scaler: dict[str, float] | None
    start: float
    blocking_s: float = 0.0
