"""Worker side of the multi-process collective tests, and what the parent shares with it.

The parent (the test module) draws the cases with a seeded RNG and sends them as JSON; each worker
rebuilds every rank's input from ``(case seed, rank)``, so it can also form the exact float64 sum.
Workers return raw measurements (errors, digests, byte counts, losses, gradients); all the
judging happens in the parent.
"""

from __future__ import annotations

import copy
import hashlib
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainplan.runtime.collectives import ALLREDUCE, CollectiveError, CommHook, WireCounter, allreduce, hook_for
from trainplan.runtime.collectives.ring import allreduce_ring
from trainplan.runtime.compression import CompressionOptions, compression_hook
from trainplan.runtime.local_workers import WorkerContext

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# ---------------------------------------------------------------- shared with the parent


def case_input(case: dict[str, Any], rank: int) -> torch.Tensor:
    """Rank ``rank``'s input of ``case``: normal values times ``scale``, in the case's dtype."""
    gen = torch.Generator().manual_seed(case["seed"] * 1009 + rank)
    return (torch.randn(case["numel"], generator=gen, dtype=torch.float64) * case["scale"]).to(DTYPES[case["dtype"]])


def make_model(seed: int, hidden: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 4))


def make_data(world: int, per_rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(world * per_rank, 8, generator=gen), torch.randn(world * per_rank, 4, generator=gen)


def reference_losses(world: int, train: dict[str, Any]) -> list[float]:
    """One process, the whole batch, plain SGD: what every synchronous DDP run must reproduce."""
    model = make_model(train["seed"], train["hidden"])
    x, y = make_data(world, train["per_rank"], train["seed"])
    opt = torch.optim.SGD(model.parameters(), lr=train["lr"])
    losses = []
    for _ in range(train["steps"]):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def digest(t: torch.Tensor) -> str:
    ints = t.view(torch.int16 if t.element_size() == 2 else torch.int32)
    return hashlib.sha1(ints.numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------- all-reduce cases


def variants(world: int) -> list[tuple[str, dict[str, Any]]]:
    """Every algorithm, ring and tree cut into small pieces, hierarchical with each ``local_size``
    that divides the group (and, on 4 ranks, each cross-node algorithm)."""
    out: list[tuple[str, dict[str, Any]]] = [(a, {}) for a in ALLREDUCE if a != "hierarchical"]
    # small pieces / chunks, so that pipelining is exercised at test sizes
    out += [("ring", {"min_piece_bytes": 1024}), ("tree", {"min_chunk_bytes": 1024})]
    out += [("hierarchical", {"local_size": d}) for d in range(1, world + 1) if world % d == 0]
    if world == 4:
        out += [("hierarchical", {"local_size": 2, "inter": inter}) for inter in ("tree", "native")]
    return out


def run_case(case: dict[str, Any], group: dist.ProcessGroup | None, members: list[int]) -> dict[str, Any]:
    """One input through every algorithm: normalised errors against the exact sum and against
    ``native``, a digest of the result (to compare ranks), and the bytes sent."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    inputs = [case_input(case, m) for m in members]
    exact = torch.stack([x.double() for x in inputs]).sum(0) if case["numel"] else torch.zeros(0, dtype=torch.float64)
    scale = torch.stack([x.double().abs() for x in inputs]).sum(0).clamp_min(1e-300) if case["numel"] else exact
    native = inputs[rank].clone()
    dist.all_reduce(native, group=group)
    out: dict[str, Any] = {"native_err": _max((native.double() - exact).abs() / scale), "runs": []}
    for algo, options in variants(world):
        y, counter = inputs[rank].clone(), WireCounter()
        allreduce(y, algo, group, counter=counter, **options)
        out["runs"].append({"algo": algo, "options": options, "digest": digest(y),
                            "err": _max((y.double() - exact).abs() / scale),
                            "vs_native": _max((y.double() - native.double()).abs() / scale),
                            "sent": counter.sent_bytes, "modeled": counter.modeled_bytes})
    return out


def _max(t: torch.Tensor) -> float:
    return t.max().item() if t.numel() else 0.0


def run_subgroup(ctx: WorkerContext, cases: list[dict[str, Any]], members: list[int]) -> list[dict[str, Any]] | None:
    """The same cases inside a subgroup that skips a rank (every rank creates it, members run it)."""
    group = dist.new_group(members)
    if ctx.rank not in members:
        return None
    return [run_case(c, group, members) for c in cases]


# ---------------------------------------------------------------- DDP training


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def true_mean_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over ranks of the local gradients at ``model``'s parameters, and of their magnitudes
    (a plain copy, no DDP, then the backend's fp32 all-reduce)."""
    plain = copy.deepcopy(model)
    nn.functional.mse_loss(plain(x), y).backward()
    local = flat_grads(plain)
    both = torch.stack([local, local.abs()])
    dist.all_reduce(both)
    return both[0] / world, both[1] / world


def train(ctx: WorkerContext, spec: dict[str, Any], hook: CommHook | None, *, bucket_cap_mb: float | None = None,
          probe: bool = False) -> dict[str, Any]:
    """``spec['steps']`` SGD steps of DDP with ``hook``: the global mean loss per step, the bytes the
    hook sent per step, and with ``probe`` the applied and true mean gradients per step."""
    model = make_model(spec["seed"], spec["hidden"])
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb) if bucket_cap_mb else DDP(model)
    if hook is not None:
        hook.register(ddp)
    x, y = make_data(ctx.world_size, spec["per_rank"], spec["seed"])
    rows = slice(ctx.rank * spec["per_rank"], (ctx.rank + 1) * spec["per_rank"])
    x, y = x[rows], y[rows]
    opt = torch.optim.SGD(ddp.parameters(), lr=spec["lr"])
    out: dict[str, Any] = {"losses": [], "bytes": [], "applied": [], "true": [], "true_abs": []}
    for _ in range(spec["steps"]):
        if probe:
            mean, mean_abs = true_mean_grad(model, x, y, ctx.world_size)
            out["true"].append(mean.tolist())
            out["true_abs"].append(mean_abs.tolist())
        before = hook.state.counter.total_bytes if hook is not None else 0
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        if probe:
            out["applied"].append(flat_grads(model).tolist())
        opt.step()
        out["bytes"].append((hook.state.counter.total_bytes if hook is not None else 0) - before)
        total = loss.detach().clone()
        dist.all_reduce(total)
        out["losses"].append(total.item() / ctx.world_size)
    out["calls"] = hook.state.calls if hook is not None else 0
    out["shapes"] = [list(p.shape) for p in model.parameters()]
    out["model"] = model
    if hook is not None:
        hook.close()
    return out


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "model"}


def hierarchical_size(world: int) -> int:
    """A true two-level split when there is one (2 ranks per node), else one node."""
    return 2 if world % 2 == 0 and world > 2 else world


def run_training(ctx: WorkerContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Plain DDP, then DDP with each algorithm's hook (one bucket, and ring with a bucket per tensor)."""
    local = hierarchical_size(ctx.world_size)
    out = {"plain": _public(train(ctx, spec, None))}
    for algo in ALLREDUCE:
        options = {"local_size": local} if algo == "hierarchical" else {}
        out[algo] = _public(train(ctx, spec, hook_for(algo, **options)))
    out["ring_buckets"] = _public(train(ctx, spec, hook_for("ring"), bucket_cap_mb=1e-4))
    return out


# ---------------------------------------------------------------- compression


def residual_mean(state: Any, model: nn.Module, world: int) -> list[float]:
    flat = torch.cat([state.residual(p) if state.residual(p) is not None else torch.zeros(p.numel())
                      for p in model.parameters()])
    dist.all_reduce(flat)
    return (flat / world).tolist()


def run_compression(ctx: WorkerContext, spec: dict[str, Any]) -> dict[str, Any]:
    """fp16 / bf16 over every algorithm, top-k with error feedback over both exchanges, PowerSGD."""
    local = hierarchical_size(ctx.world_size)
    out: dict[str, Any] = {"cast": {}, "topk": {}}
    one_step = {**spec, "steps": 2}
    for kind in ("fp16", "bf16"):
        for algo in ALLREDUCE:
            options = {"local_size": local} if algo == "hierarchical" else {}
            run = train(ctx, one_step, compression_hook(kind, algo, **options), probe=True)
            out["cast"][f"{kind}/{algo}"] = _public(run)
    ratio = spec["topk_ratio"]
    for exchange in ("ring", "native"):
        hook = compression_hook("topk", exchange, options=CompressionOptions(topk_ratio=ratio))
        run = train(ctx, spec, hook, probe=True)
        run["residual"] = residual_mean(hook.state, run["model"], ctx.world_size)
        out["topk"][exchange] = _public(run)
    psgd = {**spec, "steps": spec["powersgd_steps"], "hidden": spec["powersgd_hidden"]}
    hook = compression_hook("powersgd", "native", options=CompressionOptions(powersgd_rank=1, powersgd_start_iter=2))
    run = train(ctx, psgd, hook)
    ts = hook.state.torch_state
    out["powersgd"] = {**_public(run), "numel_before": ts.total_numel_before_compression,
                       "numel_after": ts.total_numel_after_compression, "iter": ts.iter}
    return out


# ---------------------------------------------------------------- errors


def run_errors(ctx: WorkerContext) -> dict[str, str]:
    """Clear errors for bad arguments, raised on every rank before anything is sent."""
    out = {}
    for name, call in {
        "unknown": lambda: allreduce(torch.ones(3), "butterfly"),
        "local_size": lambda: allreduce(torch.ones(3), "hierarchical", local_size=ctx.world_size + 1),
        "strided": lambda: allreduce(torch.ones(4, 4).t(), "ring"),
        "powersgd_ring": lambda: compression_hook("powersgd", "ring"),
        "topk_tree": lambda: compression_hook("topk", "tree"),
    }.items():
        try:
            call()
            out[name] = "no error"
        except (CollectiveError, ValueError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def run_timeout(ctx: WorkerContext, seconds: float) -> dict[str, Any]:
    """Rank 0 all-reduces alone; its ring must fail after ``seconds``, not hang. Last thing run."""
    if ctx.rank != 0:
        time.sleep(seconds + 1.5)
        return {}
    start = time.monotonic()
    try:
        allreduce_ring(torch.ones(10), timeout=timedelta(seconds=seconds))
        return {"error": None, "elapsed": time.monotonic() - start}
    except CollectiveError as exc:
        return {"error": str(exc), "elapsed": time.monotonic() - start}


def collectives_worker(ctx: WorkerContext) -> dict[str, Any]:
    cfg = ctx.config
    torch.manual_seed(0)
    out: dict[str, Any] = {"cases": [run_case(c, None, list(range(ctx.world_size))) for c in cfg["cases"]]}
    if cfg.get("subgroup"):
        out["subgroup"] = run_subgroup(ctx, cfg["cases"][: cfg["subgroup_cases"]], cfg["subgroup"])
    out["training"] = run_training(ctx, cfg["train"])
    out["compression"] = run_compression(ctx, cfg["train"])
    out["errors"] = run_errors(ctx)
    if cfg.get("timeout_s"):
        out["timeout"] = run_timeout(ctx, cfg["timeout_s"])
    return out
