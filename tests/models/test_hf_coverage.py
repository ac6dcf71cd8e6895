"""The coverage corpus (bench/coverage.py) on meta: inspect counts every model's parameters exactly.

Also checks the new Hugging Face families against the library itself: the wrappers' forward
(what pipeline stages cut) equals the library's own forward, and the meta build restores buffers.
"""

from __future__ import annotations

import pytest
import torch

from trainplan import api
from trainplan.errors import SpecError
from trainplan.ir.spec import HFModel, ModelSpec, TaskSpec
from trainplan.models import build_model, init_parameters, materialize, resolve_task
from trainplan.models.hf import ARCHS, library_forward
from trainplan.runtime.stages import split_stages

from tests.bench.scripts import load_bench

pytest.importorskip("transformers")


def _coverage():  # noqa: ANN202
    return load_bench("coverage", "coverage_bench")


COVERAGE = _coverage()


def test_the_corpus_covers_every_hf_arch_and_the_catalogue() -> None:
    hf = {model["hf"]["arch"] for model, _ in COVERAGE.CORPUS.values() if "hf" in model}
    catalogue = {model["catalogue"] for model, _ in COVERAGE.CORPUS.values() if "catalogue" in model}
    assert hf == set(ARCHS)
    assert catalogue == {"gpt", "llama", "bert", "mlp", "cnn"}


@pytest.mark.parametrize("name", sorted(COVERAGE.CORPUS))
def test_inspect_counts_the_models_own_parameters(name: str) -> None:
    spec = COVERAGE.corpus_spec(name, {"preset": "cpu-local", "devices_per_node": 2})
    module = build_model(spec.model, spec.task, device="meta").module
    own = sum(p.numel() for p in module.parameters())
    if spec.model.hf is not None:
        assert own == module.hf.num_parameters()  # the library's count, tied weights once
    assert api.trace(spec).params == own


def _spec(name: str) -> ModelSpec:
    return ModelSpec.model_validate(COVERAGE.CORPUS[name][0])


def _inputs(task: TaskSpec) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if task.kind == "lm":
        return torch.randint(0, task.vocab, (2, 16), generator=generator)
    return torch.randn(2, *task.input_shape, generator=generator)


@pytest.mark.parametrize("name", ["hf-mistral", "hf-qwen2", "hf-t5", "hf-vit"])
def test_new_families_equal_the_library_forward_and_survive_the_meta_build(name: str) -> None:
    model, task = COVERAGE.CORPUS[name]
    built = build_model(_spec(name), TaskSpec.model_validate(task), device="cpu")
    ours = built.module.eval()
    init_parameters(ours, seed=1)
    meta = materialize(build_model(_spec(name), TaskSpec.model_validate(task)).module.eval(), "cpu", seed=1)
    x = _inputs(built.task)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), library_forward(ours, x), rtol=0, atol=0)
        torch.testing.assert_close(meta(x), ours(x), rtol=0, atol=0)


def test_vit_is_an_image_classifier_and_pipeline_stages_cut_it() -> None:
    built = build_model(_spec("hf-vit"), TaskSpec(kind="classification"), device="cpu")
    assert (built.task.input_shape, built.task.classes) == ([3, 8, 8], 10)
    # An encoder over (8 / 4)^2 patch tokens and [CLS]; its head's outputs are the classes.
    facts = built.facts
    assert (facts.kind, facts.layers, facts.hidden, facts.heads, facts.ffn_hidden) == ("encoder", 2, 32, 4, 64)
    assert (facts.seq_len, facts.vocab, facts.tied_embeddings, facts.tensor_parallel) == (5, 10, False, True)
    model = built.module.eval()
    init_parameters(model, seed=1)
    stages = split_stages(model, [["hf.vit.embeddings", "hf.vit.layers.0"],
                                  ["hf.vit.layers.1", "hf.vit.layernorm", "hf.classifier"]])
    x = _inputs(built.task)
    with torch.no_grad():
        torch.testing.assert_close(stages[1](stages[0](x)), model(x), rtol=0, atol=0)
    with pytest.raises(SpecError) as err:
        resolve_task(_spec("hf-vit"), TaskSpec(kind="classification", input_shape=[3, 16, 16]))
    assert err.value.problems[0][0] == "task.input_shape"


def test_t5_task_and_facts() -> None:
    built = build_model(_spec("hf-t5"))
    assert built.facts is None  # measured from its graph; no closed-form decoder/encoder facts
    assert (built.task.kind, built.task.vocab, built.task.seq_len) == ("lm", 64, 512)
    assert "hf" in built.module.keep_whole
    longer = resolve_task(_spec("hf-t5"), TaskSpec(seq_len=1024))  # relative positions: 512 is only a default
    assert longer.seq_len == 1024


def test_mistral_sequences_are_limited_to_the_sliding_window() -> None:
    config = {**COVERAGE.ROTARY, "max_position_embeddings": 64, "sliding_window": 16}
    spec = ModelSpec(hf=HFModel(arch="mistral", config=config))
    assert resolve_task(spec, TaskSpec()).seq_len == 16
    with pytest.raises(SpecError, match="at most 16 positions"):
        resolve_task(spec, TaskSpec(seq_len=32))


def test_hf_facts_allow_tensor_parallelism_but_not_sequence_parallelism() -> None:
    """GPT-2's fused q/k/v Conv1D has a tensor-parallel split (style ``qkv``); T5 has no facts (tp stays 1)."""
    for name in ("hf-gpt2", "hf-llama", "hf-bert", "hf-vit"):
        facts = build_model(_spec(name), TaskSpec.model_validate(COVERAGE.CORPUS[name][1])).facts
        assert facts.tensor_parallel and not facts.sequence_parallel, name
    assert build_model(_spec("hf-t5")).facts is None
