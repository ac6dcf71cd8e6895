"""Catalogue models: huge builds on meta, closed-form parameter counts, a real training step."""

from __future__ import annotations

import math

import pytest
import torch

from trainplan.errors import SpecError
from trainplan.ir.spec import ModelSpec
from trainplan.models import CATALOGUE, build_model, example_inputs, init_parameters, loss_fn, synthetic_batch
from trainplan.models.llama import llama_ffn_hidden

LLAMA2_70B = dict(layers=80, hidden=8192, heads=64, kv_heads=8, ffn_hidden=28672, vocab=32000, seq_len=4096)
GPT3_175B = dict(layers=96, hidden=12288, heads=96, vocab=50257, seq_len=2048)
LLAMA_1T = dict(layers=150, hidden=25600, heads=160, kv_heads=16, vocab=128000, seq_len=8192)
HUGE = {
    "gpt": GPT3_175B,
    "llama": LLAMA2_70B,
    "bert": dict(layers=48, hidden=8192, heads=64, seq_len=2048),
    "mlp": dict(input_dim=65536, hidden=65536, layers=32, classes=1000),
    "cnn": dict(input_shape=[3, 224, 224], widths=[1024, 2048, 4096, 8192], blocks=8, classes=1000),
}
TINY = {
    "gpt": dict(layers=2, hidden=32, heads=4, vocab=64, seq_len=16),
    "llama": dict(layers=2, hidden=32, heads=4, kv_heads=2, vocab=64, seq_len=16, ffn_hidden=48),
    "bert": dict(layers=2, hidden=32, heads=4, vocab=64, seq_len=16),
    "mlp": dict(input_shape=[2, 5], hidden=16, layers=2, classes=3),
    "cnn": dict(input_shape=[3, 8, 8], widths=[4, 8], blocks=1, classes=5),
}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(name: str, args: dict, device: str = "meta"):
    return build_model(ModelSpec(catalogue=name, args=args), device=device)


def test_every_catalogue_model_is_exercised() -> None:
    assert set(HUGE) == set(CATALOGUE) == set(TINY)


@pytest.mark.parametrize("name", sorted(HUGE))
def test_huge_model_builds_on_meta(name: str) -> None:
    built = build(name, HUGE[name])
    params = list(built.module.parameters())
    assert all(p.is_meta for p in params)
    assert n_params(built.module) > 1e9


def test_llama_1t_builds_on_meta() -> None:
    built = build("llama", LLAMA_1T)
    assert built.facts is not None and built.facts.ffn_hidden == llama_ffn_hidden(25600, 256, None)
    count = n_params(built.module)
    assert count == llama_count(150, 25600, 160, 16, built.facts.ffn_hidden, 128000, tied=False)
    assert count > 1.0e12


def test_llama_1t_traces_and_runs_on_meta() -> None:
    built = build("llama", LLAMA_1T)
    graph = torch.fx.symbolic_trace(built.module)
    q_calls = [n for n in graph.graph.nodes if n.op == "call_module" and n.target.endswith("attn.q")]
    assert len(q_calls) == 150
    (tokens,) = example_inputs(built.task, batch=1)
    assert graph(tokens).shape == (1, 8192, 128000)


def llama_count(layers: int, h: int, heads: int, kv: int, f: int, vocab: int, tied: bool) -> int:
    """Per layer: q and o (h*h each), k and v (h*kv*d each), gate/up/down (h*f each), two RMSNorms."""
    d = h // heads
    per_layer = 2 * h * h + 2 * h * kv * d + 3 * h * f + 2 * h
    return layers * per_layer + h + vocab * h * (1 if tied else 2)


def test_llama2_70b_parameter_count_is_closed_form() -> None:
    built = build("llama", LLAMA2_70B)
    assert n_params(built.module) == llama_count(80, 8192, 64, 8, 28672, 32000, tied=False)
    assert n_params(built.module) == 68_976_648_192  # the published "70B"


@pytest.mark.parametrize("tied", [False, True])
def test_llama_tiny_parameter_count(tied: bool) -> None:
    built = build("llama", {**TINY["llama"], "tie_embeddings": tied})
    assert n_params(built.module) == llama_count(2, 32, 4, 2, 48, 64, tied)
    assert built.facts.tied_embeddings is tied and built.facts.gated_mlp and not built.facts.learned_positions


@pytest.mark.parametrize(
    ("hidden", "multiple_of", "multiplier", "expected"),
    [(4096, 256, None, 11008), (5120, 256, None, 13824), (8192, 4096, 1.3, 28672)],
)
def test_llama_default_ffn_matches_published_sizes(hidden: int, multiple_of: int, multiplier, expected: int) -> None:
    assert llama_ffn_hidden(hidden, multiple_of, multiplier) == expected
    args = dict(layers=1, hidden=hidden, heads=32, multiple_of=multiple_of, ffn_multiplier=multiplier)
    assert build("llama", args).facts.ffn_hidden == expected


def test_gpt3_parameter_count_is_megatron_eq2() -> None:
    l, h, v, s = 96, 12288, 50257, 2048
    expected = 12 * l * h * h + 13 * l * h + (v + s) * h + 2 * h
    assert n_params(build("gpt", GPT3_175B).module) == expected


def test_bert_parameter_count_is_closed_form() -> None:
    l, h, v, s, f = 2, 32, 64, 16, 128
    expected = (v + s + 2) * h + 2 * h + l * (4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h) + h * h + 3 * h + v
    built = build("bert", TINY["bert"])
    assert n_params(built.module) == expected
    assert built.facts.kind == "encoder" and built.facts.tied_embeddings


def test_mlp_parameter_count_is_closed_form() -> None:
    d, hid, layers, c = 10, 16, 2, 3
    expected = d * hid + hid + (layers - 1) * (hid * hid + hid) + hid * c + c
    assert n_params(build("mlp", TINY["mlp"]).module) == expected


def test_cnn_parameter_count_is_closed_form() -> None:
    stem = 9 * 3 * 4 + 2 * 4
    block1 = 9 * 4 * 4 + 9 * 4 * 4 + 4 * 4
    block2 = 9 * 4 * 8 + 9 * 8 * 8 + 4 * 8 + 4 * 8 + 2 * 8  # stride 2 and wider: projection shortcut
    head = 8 * 5 + 5
    assert n_params(build("cnn", TINY["cnn"]).module) == stem + block1 + block2 + head


def test_cnn_downsamples_each_later_stage() -> None:
    module = build("cnn", dict(input_shape=[3, 32, 32], widths=[4, 8, 16], blocks=2), device="cpu").module
    shapes = []
    x = torch.relu(module.bn(module.stem(torch.zeros(1, 3, 32, 32))))
    for layer in module.layers:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes == [(4, 32, 32), (4, 32, 32), (8, 16, 16), (8, 16, 16), (16, 8, 8), (16, 8, 8)]


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_model_trains_one_step_on_cpu(name: str) -> None:
    built = build(name, TINY[name], device="cpu")
    init_parameters(built.module, seed=0)
    inputs, targets = synthetic_batch(built.task, batch=4, seed=0, step=0)
    optimizer = torch.optim.Adam(built.module.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in built.module.parameters()]
    loss = loss_fn(built.task)(built.module(inputs), targets)
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item())
    grads = [p.grad for p in built.module.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    changed = sum(not torch.equal(b, p) for b, p in zip(before, built.module.parameters()))
    assert changed == len(before)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_model_traces_with_fx_and_export_on_meta(name: str) -> None:
    built = build(name, TINY[name])
    inputs = example_inputs(built.task, batch=2)
    graph = torch.fx.symbolic_trace(built.module)
    expected = (2, built.task.seq_len, built.task.vocab) if built.task.kind == "lm" else (2, built.task.classes)
    assert tuple(graph(*inputs).shape) == expected
    exported = torch.export.export(built.module, inputs)
    assert [tuple(s.meta["val"].shape) for s in exported.graph.find_nodes(op="output")[0].args[0]] == [expected]


def test_llama_gqa_equals_attention_with_repeated_kv_heads() -> None:
    """kv_heads=2 of 4 heads equals full attention whose k/v weights repeat each kv head twice."""
    gqa = build("llama", TINY["llama"], device="cpu").module
    full = build("llama", {**TINY["llama"], "kv_heads": 4}, device="cpu").module
    init_parameters(gqa, seed=3)
    state = gqa.state_dict()
    for key in [k for k in state if k.endswith(("attn.k.weight", "attn.v.weight"))]:
        per_head = state[key].view(2, 8, 32)
        state[key] = per_head.repeat_interleave(2, dim=0).reshape(32, 32)
    full.load_state_dict(state)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gqa(tokens), full(tokens))


def test_llama_is_causal_and_position_aware() -> None:
    model = build("llama", {**TINY["llama"], "layers": 1}, device="cpu").module
    init_parameters(model, seed=1)
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 64
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # earlier positions never see later tokens
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    # One causal layer without positions would see the prefix as a set: swapping two earlier
    # tokens would leave the last output unchanged. Rotary embeddings make order matter.
    swapped = tokens.clone()
    swapped[0, [2, 5]] = tokens[0, [5, 2]]
    assert tokens[0, 2] != tokens[0, 5]
    assert not torch.allclose(model(swapped)[0, -1], a[0, -1])


@pytest.mark.parametrize(
    ("name", "args", "path", "needle"),
    [
        ("llama", dict(layers=1, hidden=30, heads=4), "model.args", "must divide hidden"),
        ("llama", dict(layers=1, hidden=32, heads=4, kv_heads=3), "model.args", "kv_heads (3) must divide heads (4)"),
        ("llama", dict(layers=1, hidden=36, heads=4), "model.args", "must be even"),
        ("llama", dict(layers=0, hidden=32, heads=4), "model.args.layers", "greater than 0"),
        ("llama", dict(layers=1, hidden=32, heads=4, kv_head=2), "model.args.kv_head", "did you mean 'kv_heads'"),
        ("bert", dict(layers=1, hidden=30, heads=4), "model.args", "must divide hidden"),
        ("mlp", dict(input_dim=3, input_shape=[3]), "model.args", "exactly one of"),
        ("mlp", dict(hidden=3), "model.args", "exactly one of"),
        ("cnn", dict(input_shape=[32, 32]), "model.args", "[channels, height, width]"),
        ("cnn", dict(widths=[]), "model.args", "at least one stage"),
    ],
)
def test_impossible_args_are_spec_errors(name: str, args: dict, path: str, needle: str) -> None:
    with pytest.raises(SpecError) as err:
        build(name, args)
    assert [p for p, _ in err.value.problems] == [path]
    assert needle in err.value.problems[0][1]


def test_unknown_catalogue_name_lists_known() -> None:
    with pytest.raises(SpecError) as err:
        build("resnet", {})
    assert err.value.problems[0][0] == "model.catalogue"
    assert "bert, cnn, gpt, llama, mlp" in str(err.value)
