"""Deterministic initialisation: values depend only on (seed, name, shape)."""

from __future__ import annotations

import math

import pytest
import torch

from trainplan.errors import TrainplanError
from trainplan.ir.spec import ModelSpec
from trainplan.models import build_model, init_parameter, init_parameters, tied_names
from trainplan.models.gpt import Block, GPTConfig
from trainplan.models.init import init_rule, materialize, retie, stable_seed

GPT_ARGS = dict(layers=3, hidden=32, heads=4, vocab=64, seq_len=16)
SPECS = {
    "gpt": ModelSpec(catalogue="gpt", args=GPT_ARGS),
    "llama": ModelSpec(catalogue="llama", args=dict(layers=2, hidden=32, heads=4, kv_heads=2, vocab=64)),
    "bert": ModelSpec(catalogue="bert", args=dict(layers=2, hidden=32, heads=4, vocab=64, seq_len=16)),
    "mlp": ModelSpec(catalogue="mlp", args=dict(input_dim=8, hidden=16)),
    "cnn": ModelSpec(catalogue="cnn", args=dict(input_shape=[3, 8, 8], widths=[4, 8], blocks=1)),
}


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", sorted(SPECS))
def test_same_seed_same_parameters_different_seed_different(name: str) -> None:
    first = build_model(SPECS[name], device="cpu").module
    second = build_model(SPECS[name], device="cpu").module
    init_parameters(first, seed=7)
    init_parameters(second, seed=7)
    assert_states_equal(state(first), state(second))
    init_parameters(second, seed=8)
    weights = [k for k, v in first.state_dict().items() if v.dim() >= 2]
    assert all(not torch.equal(first.state_dict()[k], second.state_dict()[k]) for k in weights)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_meta_build_materialised_with_to_empty_equals_cpu_build(name: str) -> None:
    """The runtime's path: build on meta, allocate with to_empty, initialise (buffers included)."""
    on_cpu = build_model(SPECS[name], device="cpu").module
    init_parameters(on_cpu, seed=1)
    from_meta = materialize(build_model(SPECS[name], device="meta").module, "cpu", seed=1)
    assert_states_equal(state(on_cpu), state(from_meta))
    assert tied_names(from_meta) == tied_names(on_cpu)


def test_to_empty_alone_would_untie_the_head() -> None:
    """Why materialize() exists: to_empty gives each owner of a shared parameter its own tensor."""
    model = build_model(SPECS["bert"], device="meta").module.to_empty(device="cpu")
    assert tied_names(model) == {}
    retie(model, {"head.lm_head.weight": "wte.weight"})
    assert model.head.lm_head.weight is model.wte.weight


def test_materialize_a_stage_holding_only_part_of_the_model() -> None:
    full = build_model(SPECS["gpt"], device="cpu").module
    init_parameters(full, seed=4)
    layer = materialize(Block(GPTConfig(**GPT_ARGS)).to("meta"), "cpu", seed=4, prefix="layers.1")
    assert_states_equal(state(layer), state(full.layers[1]))


def test_a_layer_built_alone_equals_the_same_layer_in_the_full_model() -> None:
    full = build_model(SPECS["gpt"], device="cpu").module
    init_parameters(full, seed=5)
    alone = Block(GPTConfig(**GPT_ARGS))
    init_parameters(alone, seed=5, prefix="layers.2")
    assert_states_equal(state(alone), state(full.layers[2]))
    assert not torch.equal(full.layers[1].attn.q.weight, full.layers[2].attn.q.weight)


def test_init_parameter_of_one_tensor_matches_the_model() -> None:
    full = build_model(SPECS["llama"], device="cpu").module
    init_parameters(full, seed=2)
    for name, param in full.named_parameters():
        single = torch.empty(param.shape)
        init_parameter(name, single, seed=2)
        assert torch.equal(single, param), name


def test_tied_parameters_are_initialised_once_under_the_first_name() -> None:
    gpt = build_model(SPECS["gpt"], device="cpu").module
    init_parameters(gpt, seed=0)
    assert tied_names(gpt) == {"lm_head.weight": "wte.weight"}
    assert gpt.lm_head.weight is gpt.wte.weight
    head_alone = torch.empty(64, 32)
    init_parameter(tied_names(gpt)["lm_head.weight"], head_alone, seed=0)
    assert torch.equal(head_alone, gpt.lm_head.weight)
    assert tied_names(build_model(SPECS["llama"], device="cpu").module) == {}


def test_rules_follow_the_parameter_kind() -> None:
    model = build_model(SPECS["cnn"], device="cpu").module
    model.layers[0].bn1.running_mean.fill_(3.0)
    init_parameters(model, seed=0)
    assert torch.equal(model.bn.weight, torch.ones(4)) and torch.equal(model.bn.bias, torch.zeros(4))
    assert torch.equal(model.layers[0].bn1.running_mean, torch.zeros(4))
    assert torch.equal(model.head.bias, torch.zeros(10))
    assert init_rule("layers.0.ln_1.weight", (32,)) == "ones"
    assert init_rule("layers.0.attn.q.bias", (32,)) == "zeros"
    assert init_rule("wte.weight", (64, 32)) == "normal"
    assert init_rule("stem.weight", (4, 3, 3, 3)) == "kaiming"


def test_linear_and_conv_standard_deviations() -> None:
    linear = torch.empty(256, 512)
    init_parameter("fc.weight", linear, seed=0)
    assert abs(linear.std().item() - 0.02) < 0.0005 and abs(linear.mean().item()) < 0.0005
    conv = torch.empty(256, 64, 3, 3)
    init_parameter("conv.weight", conv, seed=0)
    expected = math.sqrt(2.0 / (64 * 9))  # He et al. 2015, fan_in = 64 * 3 * 3
    assert abs(conv.std().item() - expected) < 0.01 * expected


def test_seeds_are_stable_and_name_dependent() -> None:
    assert stable_seed(0, "wte.weight") == stable_seed(0, "wte.weight")
    assert len({stable_seed(s, n) for s in (0, 1) for n in ("a.weight", "b.weight")}) == 4
    assert 0 <= stable_seed(123, "x") < 2**63


def test_meta_tensors_are_left_alone() -> None:
    meta = torch.empty(4, 4, device="meta")
    init_parameter("fc.weight", meta, seed=0)
    assert meta.is_meta


def test_materialize_refuses_buffers_it_cannot_restore() -> None:
    module = torch.nn.Linear(2, 2, device="meta")
    module.register_buffer("position_ids", torch.arange(4, device="meta"), persistent=False)
    with pytest.raises(TrainplanError, match="position_ids"):
        materialize(module, "cpu", seed=0)
