"""A checkpoint on disk: its folder, manifest and checksums, finding the latest complete one, the
atomic commit, and reading DCP's metadata without unpickling arbitrary objects
(:mod:`~trainplan.runtime.checkpoint` has the whole story).

**Complete or absent.** Ranks write into ``step-000123.tmp/``; after DCP's own commit and a
barrier, rank 0 writes the manifest with the checksums, fsyncs it, and renames the folder to
``step-000123/`` (:func:`commit`), an atomic rename on POSIX file systems. Loading verifies the
manifest and every checksum (:func:`find_latest`); a corrupt or truncated checkpoint is reported
and skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from trainplan.errors import TrainplanError
from trainplan.ir.loading import dump_yaml
from trainplan.ir.plan import Plan
from trainplan.ir.spec import Spec
from trainplan.models import resolve_task


FORMAT = 1
MANIFEST = "manifest.json"
PLAN_FILE = "plan.yaml"
STEP_PREFIX = "step-"
FAULT_ENV = "TRAINPLAN_FAULT"
ASIDE_SUFFIX = ".replaced"
"""An older checkpoint of the same step, moved aside while :func:`commit` puts the new one in place."""
IDENTITY_FIELDS = ("model", "task", "training.seed", "training.global_batch", "training.optimizer")
"""Spec fields a checkpoint is tied to: the tensors' names and shapes, the data order, the state's keys."""


class CheckpointError(TrainplanError):
    """A checkpoint folder that cannot be resumed from: missing, empty, corrupt, or another spec's."""


# ---------------------------------------------------------------------------------------------
# Names, hashes, manifests


def step_name(step: int) -> str:
    """``step-000123``: the folder of the checkpoint taken after ``step`` completed steps."""
    return f"{STEP_PREFIX}{step:06d}"


def step_of(path: Path) -> int | None:
    """The completed steps a checkpoint folder's name says (``step-000123`` → 123), None for any other name."""
    name = path.name
    if not name.startswith(STEP_PREFIX) or not name[len(STEP_PREFIX):].isdigit():
        return None
    return int(name[len(STEP_PREFIX):])


def _field(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def identity(spec: Spec) -> dict[str, Any]:
    """The spec fields a checkpoint is tied to (``IDENTITY_FIELDS``), as JSON values."""
    data = spec.model_dump(mode="json", by_alias=True)
    # The task as the model fills it in (vocab, seq_len), so a planned spec and a hand-written one agree.
    data["task"] = resolve_task(spec.model, spec.task).model_dump(mode="json", by_alias=True)
    return {name: _field(data, name) for name in IDENTITY_FIELDS}


def identity_hash(spec: Spec) -> str:
    """sha256 of :func:`identity`'s canonical JSON: equal for re-plans of one spec on other clusters."""
    canonical = json.dumps(identity(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Found:
    """A complete checkpoint on disk: its folder, step and manifest."""

    path: Path
    step: int
    manifest: dict[str, Any]


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder``; :class:`CheckpointError` when absent or unreadable."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST} (not a complete checkpoint)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: {MANIFEST} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{folder}: {MANIFEST} is not a trainplan checkpoint manifest of format {FORMAT}")
    return manifest


def verify(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file of the manifest is present with its size and sha256, and no other file is."""
    listed = manifest["files"]
    present = {p.name for p in folder.iterdir() if p.is_file()} - {MANIFEST}
    extra = sorted(present - set(listed))
    if extra:
        raise CheckpointError(f"{folder}: files not in the manifest: {', '.join(extra)}")
    for name, meta in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{folder}: {name} has {size} bytes, the manifest says {meta['bytes']} (truncated?)")
        if sha256_file(path) != meta["sha256"]:
            raise CheckpointError(f"{folder}: {name} does not match its sha256 in the manifest (corrupt)")


def complete_checkpoints(directory: Path) -> list[Path]:
    """Folders ``step-NNNNNN`` of ``directory`` (not ``.tmp``), newest first."""
    if not directory.is_dir():
        return []
    folders = [p for p in directory.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(folders, key=lambda p: step_of(p) or 0, reverse=True)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"args": {"hidden": 32}}}`` -> ``{"model.args.hidden": 32}`` (to name what differs)."""
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_identity(manifest: dict[str, Any], folder: Path, spec: Spec) -> None:
    """Refuse a checkpoint written for another model, task, seed, global batch or optimizer."""
    if manifest.get("identity_hash") == identity_hash(spec):
        return
    theirs, ours = _flatten(manifest.get("identity") or {}), _flatten(identity(spec))
    differences = [f"{name}: {json.dumps(theirs.get(name))} in the checkpoint, {json.dumps(ours.get(name))} now"
                   for name in sorted(set(theirs) | set(ours)) if theirs.get(name) != ours.get(name)]
    raise CheckpointError(
        f"{folder} was written for another spec ({manifest.get('spec_name', '?')}, spec hash "
        f"{str(manifest.get('spec_hash', '?'))[:12]}): " + ("; ".join(differences) or "identity hash differs")
        + "; resume only re-plans of the same spec (the model, task, seed, global batch and optimizer must match)"
    )


def find_latest(directory: Path, spec: Spec, *, checksums: bool = True,
                warn: Any = None) -> Found | None:
    """The newest complete checkpoint of ``directory`` for ``spec``, skipping corrupt ones (with a warning).

    A checkpoint of another spec is an error, not a skip: resuming it would be a mistake of the
    user's, not damage. ``checksums=False`` checks only the manifests (cheap; the worker that
    loads verifies every checksum).
    """
    warn = warn or (lambda text: print(f"trainplan: warning: {text}", file=sys.stderr, flush=True))
    for line in recover_interrupted(directory):
        print(f"trainplan: {directory}: {line}", file=sys.stderr, flush=True)
    for folder in complete_checkpoints(directory):
        try:
            manifest = read_manifest(folder)
            check_identity(manifest, folder, spec)
            if checksums:
                verify(folder, manifest)
        except CheckpointError as exc:
            if "another spec" in str(exc):
                raise
            warn(f"skipping checkpoint {exc}; falling back to the previous one")
            continue
        return Found(folder, int(manifest["step"]), manifest)
    return None


def check_resume_dir(directory: Path, spec: Spec) -> Found:
    """What ``--resume DIR`` will load, checked before any worker starts (clear errors for bad input)."""
    if not directory.exists():
        raise CheckpointError(f"--resume {directory}: no such folder")
    if not directory.is_dir():
        raise CheckpointError(f"--resume {directory}: not a folder")
    found = find_latest(directory, spec)
    if found is None:
        raise CheckpointError(
            f"--resume {directory}: no complete checkpoint (folders step-NNNNNN with a valid {MANIFEST}); "
            "start without --resume, or point --resume at a run's ckpt folder"
        )
    return found


def refuse_stale(directory: Path) -> None:
    """A fresh run must not write into a folder that already holds another run's checkpoints.

    (An elastic restart would otherwise resume from them.)
    """
    recover_interrupted(directory)
    existing = complete_checkpoints(directory)
    if existing:
        raise CheckpointError(
            f"{directory} already holds checkpoints (newest {existing[0].name}); pass --resume to continue "
            "from it, or choose another output folder"
        )




# ---------------------------------------------------------------------------------------------
# Reading DCP metadata without unpickling arbitrary objects

_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                 "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bool", "slice"}
_SAFE_GLOBALS = {("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
                 ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                 ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Accepts DCP's metadata dataclasses, ``torch.Size``, dtypes and builtin containers; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _SAFE_MODULES or (module == "builtins" and name in _SAFE_BUILTINS) \
                or (module, name) in _SAFE_GLOBALS \
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader`` whose ``.metadata`` is read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def manifest_of(folder: Path, plan: Plan, completed: int, scaler: dict[str, float] | None = None) -> dict[str, Any]:
    """The manifest of the checkpoint files in ``folder``, taken under ``plan`` after ``completed`` steps."""
    spec = plan.spec
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    return {"format": FORMAT, "step": completed, "spec_name": spec.name, "spec_hash": plan.spec_hash,
            "identity_hash": identity_hash(spec), "identity": identity(spec),
            "training": spec.training.model_dump(mode="json"),
            "mesh": plan.mesh.model_dump(mode="json"), "world_size": plan.mesh.world_size,
            "scaler": scaler, "time_ns": time.time_ns(), "files": files}


def commit(tmp: Path, final: Path, plan: Plan, completed: int, scaler: dict[str, float] | None = None) -> None:
    """Make the written ``tmp`` folder the complete checkpoint ``final``: plan, manifest (fsynced), atomic rename."""
    (tmp / PLAN_FILE).write_text(dump_yaml(plan))
    manifest = manifest_of(tmp, plan, completed, scaler)
    with (tmp / MANIFEST).open("w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    # A resume from an older checkpoint writes this step again. The old folder is renamed aside first and
    # removed only after the new one is in place: a crash in between leaves the aside, which
    # recover_interrupted() renames back (never a moment without a committed folder for the step).
    aside = final.with_name(final.name + ASIDE_SUFFIX) if final.exists() else None
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        _fsync_dir(final.parent)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside)


def recover_interrupted(directory: Path) -> list[str]:
    """Undo a :func:`commit` cut short between its renames; what was done, one line each.

    ``step-N.replaced`` is a committed checkpoint that ``commit`` moved aside to put a new
    ``step-N`` in its place: when ``step-N`` is there the swap finished and the aside is removed,
    otherwise the aside is renamed back (the new one, still ``step-N.tmp``, is written again later).
    """
    done: list[str] = []
    if not directory.is_dir():
        return done
    for aside in sorted(directory.glob(f"{STEP_PREFIX}*{ASIDE_SUFFIX}")):
        final = aside.with_name(aside.name[: -len(ASIDE_SUFFIX)])
        if step_of(final) is None or not aside.is_dir():
            continue
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            done.append(f"removed {aside.name} (replaced by {final.name})")
        else:
            os.rename(aside, final)
            _fsync_dir(directory)
            done.append(f"restored {final.name} from {aside.name} (a commit was interrupted)")
    return done


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to a JSON-lines log (``faults.jsonl``, ``resumes.jsonl``, ``checkpoints.jsonl``)."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
