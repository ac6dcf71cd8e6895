"""Hugging Face adapters: built from config only, counted, run, and compared with the catalogue."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from trainplan.errors import SpecError
from trainplan.ir.spec import HFModel, ModelSpec, TaskSpec
from trainplan.models import build_model, init_parameters, resolve_task

pytest.importorskip("transformers")

GPT2 = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
LLAMA = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, vocab_size=64, max_position_embeddings=16, rms_norm_eps=1e-5)
BERT = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
            vocab_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CONFIGS = {"gpt2": GPT2, "llama": LLAMA, "bert": BERT}


def hf_spec(arch: str, **config) -> ModelSpec:
    return ModelSpec(hf=HFModel(arch=arch, config=config))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_parameter_count_forward_and_facts(arch: str) -> None:
    built = build_model(hf_spec(arch, **CONFIGS[arch]), device="cpu")
    count = sum(p.numel() for p in built.module.parameters())
    assert count == built.module.hf.num_parameters()
    assert built.module.hf.config.use_cache is False
    logits = built.module(torch.randint(0, 64, (2, 8)))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 8, 64)
    facts = built.facts
    assert (facts.layers, facts.hidden, facts.heads, facts.vocab, facts.seq_len) == (2, 32, 4, 64, 16)
    assert built.task.vocab == 64 and built.task.seq_len == 16


def test_facts_per_architecture() -> None:
    gpt2 = build_model(hf_spec("gpt2", **GPT2)).facts
    assert (gpt2.kind, gpt2.ffn_hidden, gpt2.kv_heads, gpt2.tied_embeddings) == ("decoder", 128, 4, True)
    llama = build_model(hf_spec("llama", **LLAMA)).facts
    assert (llama.kv_heads, llama.ffn_hidden, llama.gated_mlp, llama.learned_positions) == (2, 48, True, False)
    assert llama.tied_embeddings is False
    bert = build_model(hf_spec("bert", **BERT)).facts
    assert (bert.kind, bert.ffn_hidden, bert.tied_embeddings) == ("encoder", 64, True)


def test_llama2_70b_config_builds_on_meta() -> None:
    config = dict(num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                  intermediate_size=28672, vocab_size=32000, max_position_embeddings=4096)
    built = build_model(hf_spec("llama", **config))
    assert all(p.is_meta for p in built.module.parameters())
    assert sum(p.numel() for p in built.module.parameters()) == 68_976_648_192


def test_exports_with_a_tensor_output_on_meta() -> None:
    built = build_model(hf_spec("gpt2", **GPT2))
    exported = torch.export.export(built.module, (torch.zeros(2, 8, dtype=torch.long, device="meta"),))
    (out,) = exported.graph.find_nodes(op="output")[0].args[0]
    assert tuple(out.meta["val"].shape) == (2, 8, 64)


def _copy_into_catalogue(hf_model: torch.nn.Module, ours: torch.nn.Module, rules: list[tuple[str, str]]) -> None:
    source = hf_model.state_dict()
    mapped = {}
    for name in ours.state_dict():
        hf_name = name
        for pattern, repl in rules:
            hf_name = re.sub(pattern, repl, hf_name)
        mapped[name] = source[hf_name]
    ours.load_state_dict(mapped)


LLAMA_RULES = [
    (r"^wte\.", "model.embed_tokens."), (r"^layers\.", "model.layers."), (r"^ln_f\.", "model.norm."),
    (r"\.ln_1\.", ".input_layernorm."), (r"\.ln_2\.", ".post_attention_layernorm."),
    (r"\.attn\.(q|k|v)\.", r".self_attn.\1_proj."), (r"\.attn\.proj\.", ".self_attn.o_proj."),
    (r"\.mlp\.gate\.", ".mlp.gate_proj."), (r"\.mlp\.fc\.", ".mlp.up_proj."), (r"\.mlp\.proj\.", ".mlp.down_proj."),
]
BERT_RULES = [
    (r"^wte\.", "bert.embeddings.word_embeddings."), (r"^wpe\.", "bert.embeddings.position_embeddings."),
    (r"^wtt\.", "bert.embeddings.token_type_embeddings."), (r"^ln_e\.", "bert.embeddings.LayerNorm."),
    (r"^layers\.", "bert.encoder.layer."), (r"\.attn\.q\.", ".attention.self.query."),
    (r"\.attn\.k\.", ".attention.self.key."), (r"\.attn\.v\.", ".attention.self.value."),
    (r"\.attn\.proj\.", ".attention.output.dense."), (r"\.ln_1\.", ".attention.output.LayerNorm."),
    (r"\.mlp\.fc\.", ".intermediate.dense."), (r"\.mlp\.proj\.", ".output.dense."), (r"\.ln_2\.", ".output.LayerNorm."),
    (r"^head\.dense\.", "cls.predictions.transform.dense."), (r"^head\.ln\.", "cls.predictions.transform.LayerNorm."),
    (r"^head\.lm_head\.weight", "bert.embeddings.word_embeddings.weight"), (r"^head\.lm_head\.bias", "cls.predictions.decoder.bias"),
]


@pytest.mark.parametrize(
    ("arch", "catalogue", "args", "rules"),
    [
        ("llama", "llama", dict(layers=2, hidden=32, heads=4, kv_heads=2, ffn_hidden=48, vocab=64, seq_len=16), LLAMA_RULES),
        ("bert", "bert", dict(layers=2, hidden=32, heads=4, vocab=64, seq_len=16, ffn_hidden=64), BERT_RULES),
    ],
)
def test_catalogue_model_equals_the_hf_model_with_the_same_weights(arch, catalogue, args, rules) -> None:
    hf = build_model(hf_spec(arch, **CONFIGS[arch]), device="cpu").module.eval()
    init_parameters(hf, seed=0)  # HF's own init leaves some tensors at zero; give every weight a value
    ours = build_model(ModelSpec(catalogue=catalogue, args=args), device="cpu").module.eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    _copy_into_catalogue(hf.hf, ours, rules)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(tokens), hf(tokens), rtol=1e-5, atol=1e-5)


def test_hf_task_must_be_lm() -> None:
    with pytest.raises(SpecError) as err:
        resolve_task(hf_spec("gpt2", **GPT2), TaskSpec(kind="classification"))
    assert err.value.problems[0][0] == "task.kind"


@pytest.mark.parametrize(
    ("arch", "config", "path", "needle"),
    [
        ("gpt2", {"n_layers": 2}, "model.hf.config.n_layers", "did you mean 'n_layer'"),
        ("gpt2", {"n_layer": "two"}, "model.hf.config.n_layer", "expected int"),
        ("gpt2", {"n_layer": 0}, "model.hf.config.n_layer", "expected a positive integer, got 0"),
        ("gpt2", {"n_embd": 30, "n_head": 4}, "model.hf.config.n_head", "must divide n_embd (30)"),
        ("llama", {**LLAMA, "num_key_value_heads": 3}, "model.hf.config.num_key_value_heads", "must divide"),
        ("llama", {**LLAMA, "head_dim": 16}, "model.hf.config.head_dim", "head_dim = hidden_size / num_attention_heads = 8"),
        ("bert", {"hidden_size": 32, "num_attention_heads": 5}, "model.hf.config.num_attention_heads", "must divide"),
    ],
)
def test_config_errors_name_the_key(arch: str, config: dict, path: str, needle: str) -> None:
    with pytest.raises(SpecError) as err:
        build_model(hf_spec(arch, **config))
    assert err.value.problems[0][0] == path
    assert needle in err.value.problems[0][1]


def test_legacy_keys_the_config_consumes_are_accepted() -> None:
    built = build_model(hf_spec("llama", **LLAMA, rope_theta=500000.0))
    assert built.module.hf.config.rope_parameters["rope_theta"] == 500000.0


def test_missing_transformers_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SpecError) as err:
        build_model(hf_spec("gpt2", **GPT2))
    assert err.value.problems[0][0] == "model.hf"
    assert "pip install 'trainplan[hf]'" in err.value.problems[0][1]


def _gpt2_state_for_catalogue(hf_state: dict[str, torch.Tensor], ours: torch.nn.Module, hidden: int) -> dict:
    """GPT-2 keeps q/k/v in one Conv1D (weights stored (in, out)); the catalogue splits them."""
    out = {}
    for name in ours.state_dict():
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        if not m:
            out[name] = hf_state["transformer.wte.weight" if name == "lm_head.weight" else f"transformer.{name}"]
            continue
        layer, rest = f"transformer.h.{m.group(1)}", m.group(2)
        qkv = re.match(r"attn\.(q|k|v)\.(weight|bias)", rest)
        if qkv:
            i = "qkv".index(qkv.group(1))
            fused = hf_state[f"{layer}.attn.c_attn.{qkv.group(2)}"]
            part = fused[..., i * hidden : (i + 1) * hidden]
            out[name] = part.T if qkv.group(2) == "weight" else part
            continue
        hf_name = f"{layer}.{rest}".replace("attn.proj", "attn.c_proj").replace("mlp.fc", "mlp.c_fc")
        hf_name = hf_name.replace("mlp.proj", "mlp.c_proj")
        out[name] = hf_state[hf_name].T if hf_name.endswith("weight") and "ln_" not in hf_name else hf_state[hf_name]
    return out


def test_catalogue_gpt_equals_hf_gpt2_with_the_same_weights() -> None:
    hf = build_model(hf_spec("gpt2", **GPT2), device="cpu").module.eval()
    init_parameters(hf, seed=0)
    ours = build_model(ModelSpec(catalogue="gpt", args=dict(layers=2, hidden=32, heads=4, vocab=64, seq_len=16)),
                       device="cpu").module.eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    ours.load_state_dict(_gpt2_state_for_catalogue(hf.hf.state_dict(), ours, hidden=32))
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(tokens), hf(tokens), rtol=1e-5, atol=1e-5)


def test_meta_built_hf_models_get_their_buffers_and_unknown_buffers_are_refused() -> None:
    from trainplan.errors import TrainplanError
    from trainplan.models import materialize

    meta = materialize(build_model(hf_spec("bert", **BERT)).module, "cpu", seed=0)
    embeddings = meta.hf.bert.embeddings
    assert torch.equal(embeddings.position_ids, torch.arange(16).unsqueeze(0))
    assert torch.equal(embeddings.token_type_ids, torch.zeros(1, 16, dtype=torch.long))
    stranger = build_model(hf_spec("bert", **BERT)).module
    stranger.hf.bert.encoder.register_buffer("scratch", torch.empty(3, device="meta"))  # nobody knows its values
    with pytest.raises(TrainplanError, match="hf.bert.encoder.scratch"):
        materialize(stranger, "cpu", seed=0)
