"""Hugging Face models (built from config, nothing downloaded) train like one process at pp=2 and tp=2.

One sweep of gloo workers runs every case; each is compared with ``run_reference`` of the same
spec (losses within 1e-5 relative, final parameters within 1e-5 absolute, Adam's zero-gradient
parameters within its step bound — see tests/runtime/equivalence.py). The planner's own tp=2 plans
of ViT and GPT-2 (GPT-2's fused q/k/v ``Conv1D`` split per head, style ``qkv``) also hold the
model-state bytes the planner estimated, exactly (as tests/runtime/test_measure.py checks the
catalogue GPT).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.runtime.equivalence import compare, final_params, losses, run_cases
from tests.runtime.plans import make_plan
from trainplan.api import plan as make_planner_plan
from trainplan.ir.loading import validate
from trainplan.ir.spec import Spec
from trainplan.models import build_model
from trainplan.models.init import buffer_values
from trainplan.planner.build_plan import HF_TP_STYLES
from trainplan.planner.model_costs import tp_sharded
from trainplan.runtime.checkpoint import CheckpointOptions
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.launch import launch, launch_sweep, run_reference
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


def hf_spec(arch: str, world: int = 4, parallel: dict[str, Any] | None = None, **training: Any) -> Spec:
    task = {"task": {"kind": "classification"}} if arch == "vit" else {}
    return validate(Spec, {
        "name": f"tiny-hf-{arch}",
        "model": {"hf": {"arch": arch, "config": CONFIGS[arch]}},
        **task,
        "training": {"global_batch": 8, "steps": 3, "optimizer": "adam", "lr": 1e-2, "seed": 3, **training},
        "cluster": {"preset": "cpu-local", "devices_per_node": world},
        "parallel": parallel or {},
    })


# Every parallel field fixed (as tests/runtime/test_measure.py does) except the degrees.
FIXED = {"pp": 1, "zero": 0, "schedule": "1f1b", "virtual_stages": 1, "recompute": "none", "sequence_parallel": False,
         "allreduce": "native", "sync": "sync", "compression": "none"}


def tp_plan(arch: str, dp: int = 1, **training: Any):  # noqa: ANN201 - a Plan
    """The planner's own plan of ``arch`` at tp=2 (real estimates), one micro-batch per replica."""
    parallel = {**FIXED, "dp": dp, "tp": 2, "micro_batch": 8 // dp}
    return make_planner_plan(hf_spec(arch, world=2 * dp, parallel=parallel, **training))[0]


@pytest.mark.parametrize("arch", ["llama", "bert", "vit", "gpt2"])
def test_planner_gives_hf_models_their_tp_styles_and_counts_what_they_shard(arch: str) -> None:
    """tp=2: the plan carries the family's styles, the runtime accepts them, and the estimated parameter
    bytes are those the styles leave on a rank (column-parallel weights and biases, row-parallel and
    vocabulary weights halved; norms, row-parallel biases, GPT-2's fused q/k/v bias, ViT's patch
    embedding and classifier whole). The memory model used to count every HF parameter whole."""
    p = tp_plan(arch, dp=2)
    assert p.mesh.tp == 2 and p.tp_styles == HF_TP_STYLES[arch]
    check_plan(p)
    model = build_meta_model(p.spec).module
    params = dict(model.named_parameters())  # tied parameters once
    expected = sum(4 * (t.numel() // 2 if tp_sharded(n, p.tp_styles) else t.numel()) for n, t in params.items())
    assert p.stages[0].memory_breakdown.params == expected
    whole = {"vit": "hf.vit.embeddings.patch_embeddings.projection.weight", "gpt2": "hf.transformer.h.0.attn.c_attn.bias"}
    if arch in whole:
        assert not tp_sharded(whole[arch], p.tp_styles)


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


def test_qkv_style_is_refused_where_the_fused_split_cannot_be_adjusted() -> None:
    """'qkv' needs transformers' Conv1D with three equal output blocks whose parent splits them by
    ``split_size`` (GPT-2's attention); anything else is refused before launch, naming the module."""
    spec = hf_spec("gpt2", world=2)
    with pytest.raises(PlanExecutionError, match="'hf.lm_head' is a Linear; style 'qkv' applies to Conv1D"):
        check_plan(make_plan(spec, tp=2, tp_styles={"hf.lm_head": "qkv"}))
    with pytest.raises(PlanExecutionError, match="has 128 output features, not 3 equal blocks"):
        check_plan(make_plan(spec, tp=2, tp_styles={"hf.transformer.h.*.mlp.c_fc": "qkv"}))
    wide = hf_spec("gpt2", world=2).model_dump(mode="json", by_alias=True, exclude_unset=True)
    wide["model"]["hf"]["config"]["n_inner"] = 96  # c_fc: 96 = 3 x 32 outputs, but GPT2MLP splits nothing
    with pytest.raises(PlanExecutionError, match="parent 'hf.transformer.h.0.mlp' .GPT2MLP. does not split"):
        check_plan(make_plan(validate(Spec, wide), tp=2, tp_styles={"hf.transformer.h.*.mlp.c_fc": "qkv"}))
    check_plan(make_plan(spec, tp=2, tp_styles=HF_TP_STYLES["gpt2"]))


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


@pytest.mark.slow
def test_vit_and_gpt2_at_tp2_equal_one_process_and_hold_the_estimated_model_states(tmp_path: Path) -> None:
    """The planner's tp=2 plans of ViT (q/k/v, attention output and MLP split, patch embedding and
    classifier replicated) and GPT-2 (``Conv1D`` layers; c_attn's fused q/k/v split so that each rank
    holds its heads' columns of each) train like one process, and every rank holds exactly the
    parameter, gradient and optimizer bytes the planner estimated.

    GPT-2 with SGD: the key part of c_attn's fused bias has a zero true gradient (softmax ignores a
    constant shift), which Adam would amplify to ~lr differences in that one (whole) parameter."""
    plans = {"vit": tp_plan("vit"), "gpt2": tp_plan("gpt2", optimizer="sgd", lr=0.1)}
    assert plans["gpt2"].tp_styles["hf.transformer.h.*.attn.c_attn"] == "qkv"
    outs = {name: tmp_path / name for name in plans}
    code = launch_sweep(list(plans.values()), nproc=2, out_dirs=list(outs.values()), run_dir=tmp_path / "run",
                        save_params=True)
    assert code == 0, (tmp_path / "run" / "error.txt").read_text()
    for name, p in plans.items():
        run_reference(p.spec, tmp_path / f"reference-{name}", save_params=True)
        comparison = compare(outs[name], tmp_path / f"reference-{name}", p.spec)
        assert comparison.checked == len(list(build_meta_model(p.spec).module.parameters())), name
        memory = json.loads((outs[name] / "summary.json").read_text())["memory"]
        assert len(memory["ranks"]) == 2
        for row in memory["ranks"]:
            for part in ("params", "grads", "optimizer"):
                c = row["components"][part]
                assert c["measured"] == c["estimated"], f"{name} rank {row['rank']}: {part} {c}"


@pytest.mark.slow
def test_gpt2_tp2_checkpoint_resumes_in_one_process(tmp_path: Path) -> None:
    """DCP records each rank's part of a DTensor as one block; c_attn's strided weight (and its Adam
    state) is not one, so checkpoints hold it as contiguous shards of the same tensor. A tp=2
    checkpoint after step 2, resumed in one process, ends where the single-process run does.

    Adam: c_attn's (whole) fused bias includes the key bias, whose true gradient is zero (softmax
    ignores a constant shift); Adam turns the two layouts' rounding there into steps of up to lr."""
    spec = hf_spec("gpt2", world=2)
    ckpt = tmp_path / "ckpt"
    tp2 = make_plan(spec, tp=2, tp_styles=HF_TP_STYLES["gpt2"])
    assert launch(tp2, nproc=2, out_dir=tmp_path / "tp2", checkpoint=CheckpointOptions(ckpt, every_steps=2)) == 0, (
        (tmp_path / "tp2" / "error.txt").read_text())
    resumed, one = tmp_path / "resumed", hf_spec("gpt2", world=1)  # the same model, task, data and optimizer
    assert launch(make_plan(one), nproc=1, out_dir=resumed, save_params=True,
                  checkpoint=CheckpointOptions(ckpt, resume=True)) == 0, (resumed / "error.txt").read_text()
    run_reference(one, tmp_path / "reference", save_params=True)
    ours, ref = losses(resumed), losses(tmp_path / "reference")
    assert len(ours) == 1 and abs(ours[0] - ref[2]) <= 1e-5 * abs(ref[2]), (ours, ref)
    reference = final_params(tmp_path / "reference")
    for name, value in final_params(resumed).items():
        limit = 4 * spec.training.lr * spec.training.steps if name.endswith("c_attn.bias") else 1e-5
        assert float((value - reference[name]).abs().max()) <= limit, name
