"""Single-process tests of the runtime's pieces: mesh arithmetic, data shards, stage cutting, init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.runtime.plans import gpt_spec, make_plan, mlp_spec
from trainplan.ir.loading import validate
from trainplan.ir.plan import Mesh
from trainplan.ir.spec import Spec
from trainplan.models import build_model, init_parameters, synthetic_batch
from trainplan.runtime.data import microbatches, replica_batch, shard_of
from trainplan.runtime.errors import PlanExecutionError, WorldSizeError
from trainplan.runtime.materialize import build_meta_model, materialize_local, model_aliases
from trainplan.runtime.mesh import check_world_size, coordinates
from trainplan.runtime.pipeline import local_stage_indices, tied_pairs
from trainplan.runtime.stages import split_stages


def test_coordinates_invert_mesh_rank() -> None:
    mesh = Mesh(pp=2, dp=3, tp=2)
    for rank in range(mesh.world_size):
        assert mesh.rank(*coordinates(mesh, rank)) == rank
    assert coordinates(mesh, 1) == (0, 0, 1)  # tp innermost
    assert coordinates(mesh, 6) == (1, 0, 0)


def test_world_size_mismatch_is_refused_with_the_fix() -> None:
    with pytest.raises(WorldSizeError, match=r"pp=1 x dp=4 x tp=1 needs 4 processes, but --nproc 2 gives 2"):
        check_world_size(Mesh(pp=1, dp=4, tp=1), 2, "--nproc 2")


def test_replica_shards_are_the_global_batch_in_order() -> None:
    spec = validate(Spec, mlp_spec(4))
    plan = make_plan(spec, dp=4, micro_batch=2)
    task = build_meta_model(spec).task
    whole, labels = synthetic_batch(task, 16, spec.training.seed, 7)
    parts = [replica_batch(task, 16, spec.training.seed, 7, shard_of(plan, d)) for d in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole)
    assert torch.equal(torch.cat([p[1] for p in parts]), labels)
    micro = microbatches(parts[1][0], shard_of(plan, 1))
    assert [m.shape[0] for m in micro] == [2, 2] and torch.equal(torch.cat(micro), parts[1][0])


def _gpt(**args: object) -> nn.Module:
    spec = validate(Spec, gpt_spec(1, **args))
    model = build_model(spec.model, spec.task, device="cpu").module
    init_parameters(model, 0)
    return model


def _chain(stages: list[nn.Module], *inputs: torch.Tensor) -> torch.Tensor:
    values: object = inputs
    for stage in stages:
        values = stage(*values) if isinstance(values, tuple) else stage(values)
    return values  # type: ignore[return-value]


def test_stages_chained_equal_the_model_and_keep_parameter_names() -> None:
    model = _gpt()
    stages = split_stages(model, [["wte", "wpe", "layers.0"], ["layers.1", "layers.2"], ["layers.3", "ln_f", "lm_head"]])
    tokens = torch.randint(0, 64, (2, 16))
    assert torch.equal(_chain(stages, tokens), model(tokens))
    names = [{n for n, _ in s.named_parameters(remove_duplicate=False)} for s in stages]
    assert "layers.1.attn.q.weight" in names[1] and "lm_head.weight" in names[2] and "wte.weight" in names[0]


class Skip(nn.Module):
    """``out(c(b(a(x))) + a(x))``: a skip connection from the first stage to the last."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.out(self.c(self.b(h)) + h)


def test_a_skip_tensor_is_passed_through_the_middle_stage() -> None:
    model = Skip()
    stages = split_stages(model, [["a"], ["b"], ["c", "out"]])
    middle_outputs = [n for n in stages[1].graph.nodes if n.op == "output"][0].args[0]
    assert isinstance(middle_outputs, tuple) and len(middle_outputs) == 2  # b's output and the skip
    x = torch.randn(3, 4)
    assert torch.equal(_chain(stages, x), model(x))


def test_stage_errors_name_the_module() -> None:
    model = _gpt()
    with pytest.raises(PlanExecutionError, match=r"stages\[1\]\.modules: 'layers.9' names no module"):
        split_stages(model, [["wte", "wpe", "layers.0"], ["layers.9"]])
    with pytest.raises(PlanExecutionError, match="stage boundaries must follow the order"):
        split_stages(model, [["layers.2", "layers.3", "ln_f", "lm_head"], ["wte", "wpe", "layers.0", "layers.1"]])


def test_interleaved_ranks_hold_every_pp_th_stage() -> None:
    assert local_stage_indices(1, 4, 2) == [1, 5]
    assert local_stage_indices(0, 2, 1) == [0]


def test_materialised_stage_equals_the_whole_model_and_tied_head_takes_the_embedding() -> None:
    spec = validate(Spec, gpt_spec(1))
    reference = _gpt()
    init_parameters(reference, spec.training.seed)
    meta = build_meta_model(spec).module
    aliases = model_aliases(meta)
    stages = split_stages(meta, [["wte", "wpe", "layers.0", "layers.1"], ["layers.2", "layers.3", "ln_f", "lm_head"]])
    materialize_local([stages[1]], device=torch.device("cpu"), seed=spec.training.seed, aliases=aliases)
    values = dict(stages[1].named_parameters())
    assert torch.equal(values["lm_head.weight"], reference.wte.weight)
    assert torch.equal(values["layers.3.mlp.fc.weight"], reference.layers[3].mlp.fc.weight)
    pairs = tied_pairs(aliases, [{n for n, _ in s.named_parameters(remove_duplicate=False)} for s in stages])
    assert [(p.canonical, p.alias, p.canonical_stage, p.alias_stage) for p in pairs] == [
        ("wte.weight", "lm_head.weight", 0, 1)]


def test_a_whole_materialised_model_keeps_its_tie() -> None:
    spec = validate(Spec, gpt_spec(1))
    model = build_meta_model(spec).module
    materialize_local([model], device=torch.device("cpu"), seed=spec.training.seed, aliases=model_aliases(model))
    assert model.lm_head.weight is model.wte.weight and not model.wte.weight.is_meta
