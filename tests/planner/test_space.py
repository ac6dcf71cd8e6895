from trainplan.ir.facts import TransformerFacts
from trainplan.ir.spec import ParallelSpec
from trainplan.planner.space import Layout, divisors, layouts, schedules, tp_degrees

GPT3 = TransformerFacts("decoder", 96, 12288, 96, 96, 49152, 51200, 2048, True)


def test_every_layout_uses_the_whole_cluster_and_batch():
    seen = list(layouts(ParallelSpec(), 64, 512, 98, 96, GPT3))
    assert seen and len(set(seen)) == len(seen)
    for lay in seen:
        assert lay.dp * lay.tp * lay.pp == 64
        assert lay.dp * lay.micro_batch * lay.num_microbatches == 512
        assert GPT3.heads % lay.tp == 0
        if lay.schedule == "interleaved":
            assert lay.num_microbatches % lay.pp == 0 and 96 % (lay.pp * lay.virtual_stages) == 0
        if lay.tp == 1:
            assert not lay.sequence_parallel


def test_fixed_fields_are_honoured():
    fixed = ParallelSpec(tp=8, recompute="full", zero=2, schedule="1f1b")
    seen = list(layouts(fixed, 1024, 1536, 98, 96, GPT3))
    assert seen
    assert {(lay.tp, lay.recompute, lay.zero) for lay in seen} == {(8, "full", 2)}
    assert {lay.schedule for lay in seen} == {"1f1b"}


def test_zero1_is_not_combined_with_tensor_parallelism():
    # the runtime's ZeRO-1 (ZeroRedundancyOptimizer) cannot hold DTensor parameters
    seen = list(layouts(ParallelSpec(), 16, 64, 98, 96, GPT3))
    assert any(lay.zero == 1 for lay in seen)
    assert all(lay.tp == 1 for lay in seen if lay.zero == 1)
    assert list(layouts(ParallelSpec(tp=2, zero=1), 16, 64, 98, 96, GPT3)) == []


def test_impossible_fixed_values_give_an_empty_space():
    assert list(layouts(ParallelSpec(tp=5), 64, 512, 98, 96, GPT3)) == []
    assert list(layouts(ParallelSpec(dp=3), 64, 512, 98, 96, GPT3)) == []


def test_models_without_transformer_facts_get_no_tensor_parallelism():
    assert tp_degrees(8, None) == [1]
    assert {lay.tp for lay in layouts(ParallelSpec(), 8, 64, 5, 0, None)} == {1}


def test_schedules():
    assert schedules(1, 96, 8) == [("1f1b", 1)]
    assert schedules(1, 96, 8, "gpipe") == [("gpipe", 1)]
    assert ("interleaved", 2) in schedules(4, 96, 8)
    assert all(s != "interleaved" for s, _ in schedules(4, 96, 6))
    # torch's Schedule1F1B refuses fewer micro-batches than stages: only GPipe then
    assert schedules(2, 4, 1) == [("gpipe", 1)]
    assert ("1f1b", 1) in schedules(2, 4, 2)
    assert divisors(12) == [1, 2, 3, 4, 6, 12]


def test_layout_description():
    lay = Layout(8, 8, 16, 1, 96, "interleaved", 2, 1, "full", True)
    assert lay.describe() == "dp=16 tp=8 pp=8 mb=1x96 interleaved(v=2) zero=1 recompute=full sp"
