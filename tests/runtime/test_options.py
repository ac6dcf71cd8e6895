"""Single-process tests of the runtime's options: recompute, tensor-parallel plans, loss scaling, launch checks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel
from torch.utils._python_dispatch import TorchDispatchMode

from tests.runtime.plans import GPT_TP_STYLES, gpt_spec, make_plan
from trainplan.ir.loading import validate
from trainplan.ir.spec import Spec
from trainplan.models import init_parameters
from trainplan.runtime.errors import PlanExecutionError, WorldSizeError
from trainplan.runtime.launch import failure_summary, launch
from trainplan.runtime.materialize import build_meta_model
from trainplan.runtime.precision import LossScaler
from trainplan.runtime.recompute import apply_recompute
from trainplan.runtime.structure import block_paths
from trainplan.runtime.tensor_parallel import SharedInput, parallel_plan, resolve_styles


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _ops(mode: str) -> Counter[str]:
    """Op counts of one forward + backward of a 2-layer GPT under recompute ``mode``."""
    spec = validate(Spec, gpt_spec(1, layers=2))
    model = build_meta_model(spec).module.to_empty(device="cpu")
    init_parameters(model, 0)
    apply_recompute(model, mode, block_paths(model))  # type: ignore[arg-type]
    tokens = torch.randint(0, 64, (2, 16))
    with OpCounter() as counter:
        model(tokens).sum().backward()
    return counter.counts


def test_recompute_reruns_what_it_promises() -> None:
    none, full, selective = _ops("none"), _ops("full"), _ops("selective")
    sdpa = "_scaled_dot_product_flash_attention_for_cpu"
    assert none[sdpa] == 2 and full[sdpa] == 4 and selective[sdpa] == 4  # the attention core runs again
    assert full["addmm"] > none["addmm"]  # full: the linears run again too
    assert selective["addmm"] == none["addmm"]  # selective: only the attention core


def _tp_plan(sequence_parallel: bool, styles: dict[str, str] = GPT_TP_STYLES) -> dict[str, object]:
    built = build_meta_model(validate(Spec, gpt_spec(4)))
    resolved = resolve_styles(built.module, styles)  # type: ignore[arg-type]
    return parallel_plan(built.module, resolved, built.task, sequence_parallel=sequence_parallel,
                         blocks=block_paths(built.module))


def test_tensor_parallel_plan_from_styles() -> None:
    plan = _tp_plan(False)
    assert isinstance(plan["layers.2.attn.q"], ColwiseParallel) and isinstance(plan["layers.2.mlp.proj"], RowwiseParallel)
    assert isinstance(plan["wte"], RowwiseParallel)  # the vocab-parallel embedding
    assert plan["lm_head"].use_local_output is False  # vocab-sharded logits for loss_parallel
    assert "layers.0.ln_1" not in plan  # replicated norms need no style without sequence parallelism
    # q, k, v share one replicated input (one all-reduce of its gradient); the MLP's single column layer needs none
    assert isinstance(plan["layers.2.attn"], SharedInput) and plan["layers.2.attn"].layout == Replicate()
    assert "layers.2.mlp" not in plan


def test_sequence_parallel_plan_splits_at_the_first_block_and_gathers_before_sublayers() -> None:
    plan = _tp_plan(True)
    assert isinstance(plan["layers.0"], PrepareModuleInput)
    assert isinstance(plan["layers.1.attn"], SharedInput) and isinstance(plan["layers.1.mlp"], SharedInput)
    assert plan["layers.1.mlp"].layout == Shard(1)  # gathered from the sequence split (reduce-scattered backward)
    assert isinstance(plan["layers.3.ln_2"], SequenceParallel) and isinstance(plan["ln_f"], SequenceParallel)


def test_bad_styles_are_named() -> None:
    with pytest.raises(PlanExecutionError, match=r"'layers.\*.attn.qq' names no module"):
        _tp_plan(False, {"layers.*.attn.qq": "colwise"})
    with pytest.raises(PlanExecutionError, match=r"'wpe' is a Embedding; style 'rowwise' applies to Linear"):
        _tp_plan(False, {"wpe": "rowwise"})
    unsharded_mlp = {k: v for k, v in GPT_TP_STYLES.items() if not k.startswith("layers.*.mlp")}
    with pytest.raises(PlanExecutionError, match=r"sequence_parallel: 'layers.0.mlp.fc' \(Linear\) holds parameters"):
        _tp_plan(True, unsharded_mlp)


def test_loss_scaler_halves_on_overflow_and_grows_after_clean_steps() -> None:
    scaler = LossScaler(True, torch.device("cpu"), init_scale=8.0, growth_interval=2)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([8.0, 16.0])
    assert scaler.unscale_and_check([p]) and torch.equal(p.grad, torch.tensor([1.0, 2.0]))
    p.grad = torch.tensor([float("inf"), 1.0])
    assert not scaler.unscale_and_check([p])
    scaler.update(False)
    assert scaler.scale == 4.0
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 8.0
    off = LossScaler(False, torch.device("cpu"))
    assert off.scale == 1.0 and off.unscale_and_check([p])


def test_launch_refuses_a_plan_for_another_world_size_before_starting(tmp_path: Path) -> None:
    plan = make_plan(gpt_spec(4), dp=4)
    with pytest.raises(WorldSizeError, match="needs 4 processes, but --nproc 2 gives 2"):
        launch(plan, nproc=2, out_dir=tmp_path)
    assert not (tmp_path / "plan.yaml").exists()


def test_launch_refuses_layouts_it_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(PlanExecutionError, match="zero: 1 with tp > 1 is not supported"):
        launch(make_plan(gpt_spec(4), dp=2, tp=2, zero=1, tp_styles=GPT_TP_STYLES), nproc=4, out_dir=tmp_path)
    with pytest.raises(PlanExecutionError, match="schedule 'gpipe' runs one stage per rank"):
        launch(make_plan(gpt_spec(4), pp=2, dp=2, schedule="gpipe", virtual_stages=2), nproc=4, out_dir=tmp_path)
    with pytest.raises(PlanExecutionError, match="tp = 2 but tp_styles is empty"):
        launch(make_plan(gpt_spec(4), dp=2, tp=2), nproc=4, out_dir=tmp_path)
    lossy = make_plan(gpt_spec(4), dp=4, zero=3).model_copy(update={"compression": "topk"})
    with pytest.raises(PlanExecutionError, match="runs as a DDP communication hook, which zero: 3 .FSDP2. does not take"):
        launch(lossy, nproc=4, out_dir=tmp_path)


def _record(out: Path, rank: int, kind: str, t: int) -> None:
    (out / "failures").mkdir(exist_ok=True)
    (out / "failures" / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "time_ns": t, "kind": kind, "message": f"rank {rank}: {kind}", "traceback": "tb"}))


def test_failure_summary_names_the_root_cause_first(tmp_path: Path) -> None:
    _record(tmp_path, 0, "peer", 1)
    _record(tmp_path, 2, "error", 5)
    _record(tmp_path, 3, "error", 3)
    lines = failure_summary(tmp_path, {0: 2, 2: 1, 3: 1}, 4).splitlines()
    assert lines[0] == "run failed: rank 3: error"
    assert lines[2:4] == ["then rank 2: error", "then rank 0: peer"]
    silent = failure_summary(tmp_path / "x", {1: -9}, 4).splitlines()[0]
    assert silent == "run failed: rank 1 was killed by signal 9 without reporting an error (killed, out of memory, " \
                     "or a crash in native code)"
