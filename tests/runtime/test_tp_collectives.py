"""Tensor parallelism sends what Megatron-LM sends: one reduction of the attention's and the MLP's
input gradient per layer, not one per projection (``runtime.tensor_parallel.SharedInput``)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.profiler import profile

from tests.runtime.plans import gpt_spec
from trainplan.ir.loading import validate
from trainplan.ir.spec import Spec
from trainplan.models import init_parameters
from trainplan.planner.build_plan import model_tp_styles
from trainplan.runtime.local_workers import WorkerContext, run_local_workers
from trainplan.runtime.materialize import build_meta_model
from trainplan.runtime.structure import block_paths
from trainplan.runtime.tensor_parallel import SharedInput, loss_context, parallel_plan, resolve_styles

pytestmark = pytest.mark.slow

LAYERS = 2


def _gloo_calls(prof: profile) -> dict[str, int]:
    """Collectives gloo ran under ``prof`` (its ``gloo:NAME`` events), by name."""
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith("gloo:"):
            counts[event.name[5:]] = counts.get(event.name[5:], 0) + 1
    return counts


def collectives_worker(ctx: WorkerContext) -> dict[str, Any]:
    """Every case of ``ctx.config["cases"]`` (``[model, sequence_parallel]``) in one process group,
    and the gated sub-layer that reads its own input (:func:`_gated_residual`)."""
    mesh = init_device_mesh("cpu", (2,))
    out: dict[str, Any] = {f"{model}-{sp}": _collectives(model, sp, mesh) for model, sp in ctx.config["cases"]}
    out["gated-residual"] = _gated_residual(mesh)
    return out


class GatedResidual(torch.nn.Module):
    """A sub-layer whose own code also uses its input: ``x + o(a(x) * b(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.o = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o(self.a(x) * self.b(x))


def _gated_residual(mesh: Any) -> dict[str, Any]:
    """The sub-layer at tp=2 with a shared input for ``a`` and ``b`` against the same module whole: the
    output and the input's gradient (a plain tensor, as the module's caller holds it)."""
    torch.manual_seed(0)
    whole = torch.nn.Sequential(GatedResidual())
    sharded = copy.deepcopy(whole)
    parallelize_module(sharded, mesh, {"0.a": ColwiseParallel(), "0.b": ColwiseParallel(), "0.o": RowwiseParallel(),
                                       "0": SharedInput(Replicate(), ["a", "b"])})
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    outputs, grads = [], []
    with profile() as prof:
        for model in (whole, sharded):
            leaf = x.clone().requires_grad_(True)
            y = model(leaf)
            (y * y).sum().backward()
            outputs.append(y.detach())
            grads.append(leaf.grad)
    return {"output_diff": float((outputs[0] - outputs[1]).abs().max()),
            "grad_diff": float((grads[0] - grads[1]).abs().max()), "collectives": _gloo_calls(prof)}


def _collectives(model_name: str, sequence_parallel: bool, mesh: Any) -> dict[str, dict[str, int]]:
    """Collectives gloo runs in one forward and one backward of a 2-layer catalogue model at tp=2,
    with the planner's styles."""
    data = gpt_spec(2, layers=LAYERS)
    if model_name == "llama":
        data["model"] = {"catalogue": "llama", "args": {"layers": LAYERS, "hidden": 32, "heads": 4, "kv_heads": 2,
                                                        "vocab": 64, "seq_len": 16, "multiple_of": 16}}
    built = build_meta_model(validate(Spec, data))
    model = built.module.to_empty(device="cpu")
    init_parameters(model, 0)
    styles = model_tp_styles(None, {name for name, _ in model.named_modules()}, gated_mlp=model_name == "llama")
    resolved = resolve_styles(model, styles)  # type: ignore[arg-type]
    parallelize_module(model, mesh, parallel_plan(model, resolved, built.task, sequence_parallel=sequence_parallel,
                                                  blocks=block_paths(model)))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with loss_context(True):
        with profile() as forward:
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        with profile() as backward:
            loss.backward()
    return {"forward": _gloo_calls(forward), "backward": _gloo_calls(backward)}


CASES = [["gpt", False], ["llama", False], ["gpt", True]]


@pytest.fixture(scope="module")
def counts() -> dict[str, dict[str, dict[str, int]]]:
    results = run_local_workers("tests.runtime.test_tp_collectives:collectives_worker", 2, backend="gloo",
                                config={"cases": CASES}, threads=1, timeout_s=180)
    assert results[0] == results[1]
    return results[0]


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_one_input_gradient_reduction_per_sublayer(model: str, counts: dict) -> None:
    run = counts[f"{model}-False"]
    print(model, run)
    # Backward: each layer's attention and MLP input gradient (q/k/v, gate/up share one), and the
    # head's input gradient (Shoeybi et al. 2019, Sec. 3, the f operator).
    assert run["backward"].get("all_reduce", 0) == 2 * LAYERS + 1


def test_sequence_parallel_reduces_each_sublayer_input_gradient_once(counts: dict) -> None:
    run = counts["gpt-True"]
    print(run)
    # Korthikanti et al. 2022, Sec. 4.2.2: an all-gather of the sequence in front of each attention,
    # MLP and the head; backward, one reduce-scatter of each of their input gradients (gloo runs a
    # reduce-scatter as an all-reduce).
    assert run["forward"].get("all_gather", 0) == 2 * LAYERS + 1
    assert run["backward"].get("all_reduce", 0) == 2 * LAYERS + 1


def test_a_sub_layer_that_also_reads_its_input_keeps_a_plain_tensor_and_exact_gradients(counts: dict) -> None:
    run = counts["gated-residual"]
    # the residual sum inside the module ran on its plain input; a and b's input gradients were
    # reduced once (forward: the row-parallel sum; backward: the shared input's gradient)
    assert run["output_diff"] < 1e-6 and run["grad_diff"] < 1e-6
    assert run["collectives"] == {"all_reduce": 2}
