"""Hugging Face models (built from config, nothing downloaded) train like one process at pp=2 and tp=2.

One sweep of 4 gloo workers runs every case; each is compared with ``run_reference`` of the same
spec (losses within 1e-5 relative, final parameters within 1e-5 absolute, Adam's zero-gradient
parameters within its step bound — see tests/runtime/equivalence.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.runtime.equivalence import compare, run_cases
from tests.runtime.plans import make_plan
from trainplan.ir.loading import validate
from trainplan.ir.spec import Spec
from trainplan.models import build_model
from trainplan.models.init import buffer_values
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.materialize import build_meta_model, materialize_local, model_aliases
from trainplan.runtime.parallelize import check_plan

pytest.importorskip("transformers")

ROTARY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, vocab_size=64, max_position_embeddings=16)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": ROTARY,
    "mistral": {**ROTARY, "sliding_window": 16},
    "qwen2": ROTARY,
    "bert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=64,
                 max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "vit": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, image_size=8,
                patch_size=4, num_channels=3, num_labels=10),
    "gpt2": dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}
ROTARY_STAGES = [["hf.model.embed_tokens", "hf.model.rotary_emb", "hf.model.layers.0"],
                 ["hf.model.layers.1", "hf.model.norm", "hf.lm_head"]]
STAGES = {
    "llama": ROTARY_STAGES,
    "bert": [["hf.bert.embeddings", "hf.bert.encoder.layer.0"], ["hf.bert.encoder.layer.1", "hf.cls"]],
    "vit": [["hf.vit.embeddings", "hf.vit.layers.0"], ["hf.vit.layers.1", "hf.vit.layernorm", "hf.classifier"]],
}
ROTARY_TP = {"hf.model.embed_tokens": "vocab", "hf.model.layers.*.self_attn.q_proj": "colwise",
             "hf.model.layers.*.self_attn.k_proj": "colwise", "hf.model.layers.*.self_attn.v_proj": "colwise",
             "hf.model.layers.*.self_attn.o_proj": "rowwise", "hf.model.layers.*.mlp.gate_proj": "colwise",
             "hf.model.layers.*.mlp.up_proj": "colwise", "hf.model.layers.*.mlp.down_proj": "rowwise",
             "hf.lm_head": "colwise"}
BERT_TP = {"hf.bert.embeddings.word_embeddings": "vocab", "hf.bert.encoder.layer.*.attention.self.query": "colwise",
           "hf.bert.encoder.layer.*.attention.self.key": "colwise",
           "hf.bert.encoder.layer.*.attention.self.value": "colwise",
           "hf.bert.encoder.layer.*.attention.output.dense": "rowwise",
           "hf.bert.encoder.layer.*.intermediate.dense": "colwise",
           "hf.bert.encoder.layer.*.output.dense": "rowwise", "hf.cls.predictions.decoder": "colwise"}


def hf_spec(arch: str, world: int = 4, **training: Any) -> Spec:
    task = {"task": {"kind": "classification"}} if arch == "vit" else {}
    return validate(Spec, {
        "name": f"tiny-hf-{arch}",
        "model": {"hf": {"arch": arch, "config": CONFIGS[arch]}},
        **task,
        "training": {"global_batch": 8, "steps": 3, "optimizer": "adam", "lr": 1e-2, "seed": 3, **training},
        "cluster": {"preset": "cpu-local", "devices_per_node": world},
    })


def test_meta_built_buffers_are_restored_to_the_library_values() -> None:
    """Rotary frequencies and BERT's position / token-type ids survive the meta build and to_empty."""
    for arch, owner_path in (("llama", "hf.model.rotary_emb"), ("bert", "hf.bert.embeddings")):
        spec = hf_spec(arch)
        meta = build_meta_model(spec).module
        values = buffer_values(meta.get_submodule(owner_path))
        assert values and all(not v.is_meta for v in values.values())
        materialize_local([meta], device=torch.device("cpu"), seed=3, aliases=model_aliases(meta))
        real = build_model(spec.model, spec.task, device="cpu").module  # the library's own buffers
        for (name, ours), (_, theirs) in zip(meta.named_buffers(), real.named_buffers(), strict=True):
            assert torch.equal(ours, theirs), name
    assert torch.equal(values["position_ids"], torch.arange(16).unsqueeze(0))


def test_sequence_parallel_is_refused_for_hf_models() -> None:
    plan = make_plan(hf_spec("llama", world=2), tp=2, tp_styles=ROTARY_TP, sequence_parallel=True)
    with pytest.raises(PlanExecutionError, match="sequence_parallel"):
        check_plan(plan)


def test_t5_pipeline_is_refused_with_a_message() -> None:
    spec = validate(Spec, {
        "name": "tiny-t5",
        "model": {"hf": {"arch": "t5", "config": dict(num_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64,
                                                       vocab_size=64, dropout_rate=0.0)}},
        "task": {"seq_len": 16},
        "training": {"global_batch": 8, "steps": 2},
        "cluster": {"preset": "cpu-local", "devices_per_node": 2},
    })
    plan = make_plan(spec, pp=2, stages=[["hf.shared", "hf.encoder"], ["hf.decoder", "hf.lm_head"]])
    with pytest.raises(PlanExecutionError, match="'hf' cannot be cut into stages \\[0, 1\\]: T5's decoder"):
        check_plan(plan)


@pytest.mark.slow
def test_hf_models_at_pp2_and_tp2_equal_one_process(tmp_path: Path) -> None:
    bert = hf_spec("bert", optimizer="sgd", lr=0.1)
    cases = {
        "llama-pp2-dp2": (hf_spec("llama"), dict(pp=2, dp=2, micro_batch=2, stages=STAGES["llama"])),
        "llama-tp2-dp2": (hf_spec("llama"), dict(tp=2, dp=2, tp_styles=ROTARY_TP)),
        # SGD: every parameter compared at 1e-5 (post-LN BERT has near-zero gradients that Adam
        # amplifies to ~1e-5 differences); tied embedding / MLM decoder split across the stages.
        "bert-pp2-dp2": (bert, dict(pp=2, dp=2, micro_batch=2, schedule="gpipe", stages=STAGES["bert"])),
        "bert-tp2-dp2": (bert, dict(tp=2, dp=2, tp_styles=BERT_TP)),
    }
    results = run_cases(cases, tmp_path)
    for name, (spec, out, reference) in results.items():
        comparison = compare(out, reference, spec)
        assert comparison.checked > 0, name
