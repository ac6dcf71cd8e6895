import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainplan.errors import PlanningError
from trainplan.ir.cluster import load_preset
from trainplan.ir.facts import TransformerFacts
from trainplan.ir.loading import dump_yaml, validate
from trainplan.ir.spec import ParallelSpec, Spec
from trainplan.planner import context_for
from trainplan.planner.build_plan import build_plan
from trainplan.planner.evaluate import Context, evaluate
from trainplan.planner.model_costs import ModelCosts, UnitCost, model_costs_from_facts
from trainplan.planner.search import search
from trainplan.planner.space import layouts

TINY = TransformerFacts("decoder", 4, 64, 4, 4, 256, 128, 32, True)


def _chain(draw_units):
    units = tuple(
        UnitCost(f"u{i}", "other", (f"m{i}",), params, flops, 2 * flops, acts, 1e3)
        for i, (params, flops, acts) in enumerate(draw_units)
    )
    return ModelCosts(units, None, sum(u.params for u in units))


unit_st = st.tuples(
    st.floats(1e3, 1e7), st.floats(1e6, 1e10), st.floats(1e3, 1e7)
)


def _ctx(nodes, per_node, memory, batch, precision="fp32"):
    cluster = load_preset("cpu-local", nodes=nodes, devices_per_node=per_node, device={"memory": memory, "memory_reserved": 0})
    return Context(cluster, precision, "adam", batch, 1, "auto")


def _brute_force(model, parallel, ctx):
    evs = [evaluate(model, lay, ctx) for lay in layouts(parallel, ctx.cluster.world_size, ctx.global_batch,
                                                         len(model.units), model.blocks, model.facts)]
    fitting = [e for e in evs if e.fits]
    return min(fitting, key=lambda e: (e.step_time, e.layout)) if fitting else None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(unit_st, min_size=1, max_size=6), st.sampled_from([1, 2]), st.sampled_from([1, 2, 4]),
       st.integers(2**20, 2**31), st.sampled_from([4, 8, 12, 16]))
def test_search_equals_brute_force_on_random_chains(units, nodes, per_node, memory, batch):
    model, ctx = _chain(units), _ctx(nodes, per_node, memory, batch)
    expected = _brute_force(model, ParallelSpec(), ctx)
    result = search(model, ParallelSpec(), ctx, keep=3, refine_top=0)
    if expected is None:
        assert not result.ranked
    else:
        assert result.ranked[0].step_time == pytest.approx(expected.step_time, rel=1e-6)
        assert all(e.fits for e in result.ranked)
        times = [e.step_time for e in result.ranked]
        assert times == sorted(times)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([1, 2]), st.sampled_from([2, 4]), st.sampled_from(["64 MiB", "1 GiB", "8 GiB"]),
       st.sampled_from([8, 16]), st.sampled_from(["fp32", "bf16"]))
def test_search_equals_brute_force_on_transformers(nodes, per_node, memory, batch, precision):
    model, ctx = model_costs_from_facts(TINY), _ctx(nodes, per_node, memory, batch, precision)
    expected = _brute_force(model, ParallelSpec(), ctx)
    result = search(model, ParallelSpec(), ctx, keep=3, refine_top=0)
    if expected is None:
        assert not result.ranked
    else:
        assert result.ranked[0].step_time == pytest.approx(expected.step_time, rel=1e-6)


def _spec(**parallel):
    return validate(Spec, {
        "name": "gpt-small",
        "model": {"catalogue": "gpt", "args": {"layers": 8, "hidden": 1024, "heads": 16, "vocab": 51200, "seq_len": 1024}},
        "task": {"kind": "lm", "seq_len": 1024, "vocab": 51200},
        "training": {"global_batch": 64, "precision": "bf16", "optimizer": "adam", "steps": 10, "tokens": 1e9},
        "cluster": {"preset": "a100-80g", "nodes": 2},
        "parallel": parallel,
    })


def _plan(spec):
    model = model_costs_from_facts(TransformerFacts("decoder", 8, 1024, 16, 16, 4096, 51200, 1024, True))
    ctx = context_for(spec)
    return build_plan(spec, model, search(model, spec.parallel, ctx), ctx)


def test_same_spec_gives_byte_identical_plans():
    assert dump_yaml(_plan(_spec())) == dump_yaml(_plan(_spec()))


def test_fixed_fields_are_honoured_in_the_plan():
    plan = _plan(_spec(tp=2, pp=2, schedule="gpipe", zero=2, recompute="selective"))
    assert (plan.mesh.tp, plan.mesh.pp, plan.schedule, plan.zero, plan.recompute) == (2, 2, "gpipe", 2, "selective")
    assert plan.mesh.world_size == 16
    assert len(plan.stages) == 2
    assert plan.tp_styles["layers.*.attn.q"] == "colwise" and plan.tp_styles["wte"] == "vocab"


def test_plan_estimate_is_consistent():
    plan = _plan(_spec())
    est = plan.estimate
    assert est.samples_per_s == pytest.approx(64 / est.step_time_s)
    assert est.tokens_per_s == pytest.approx(64 * 1024 / est.step_time_s)
    assert est.memory_per_device_bytes <= plan.spec.cluster.device.memory
    assert 0 < est.mfu < 1
    assert est.time_to_train_s == pytest.approx(1e9 / est.tokens_per_s)
    assert [a.rank for a in plan.alternatives] == list(range(1, len(plan.alternatives) + 1))
    assert all(a.reason for a in plan.alternatives)


def test_every_unit_is_in_exactly_one_stage():
    plan = _plan(_spec(pp=4, schedule="interleaved", virtual_stages=2))
    assert len(plan.stages) == 8
    names = [u for s in plan.stages for u in s.units]
    assert names == ["embedding", *[f"layers.{i}" for i in range(8)], "head"]
    assert sorted({r for s in plan.stages for r in s.ranks}) == list(range(16))


def test_infeasible_spec_names_the_closest_candidates_and_the_fix():
    from trainplan.planner import _no_plan_message
    from trainplan.planner.explain import what_would_fit

    spec = _spec()
    tight = validate(Spec, {**spec.model_dump(mode="json", by_alias=True),
                            "cluster": {"preset": "a100-80g", "nodes": 2, "device": {"memory": "150 MiB", "memory_reserved": "100 MiB"}}})
    model = model_costs_from_facts(TransformerFacts("decoder", 8, 1024, 16, 16, 4096, 51200, 1024, True))
    result = search(model, tight.parallel, context_for(tight))
    assert not result.ranked and result.infeasible
    message = _no_plan_message(tight, result, what_would_fit)
    assert "no layout fits" in message and "would fit with" in message and "devices" in message


def test_impossible_fixed_fields_say_why():
    from trainplan.planner import _no_plan_message
    from trainplan.planner.explain import what_would_fit

    spec = _spec(tp=3)
    model = model_costs_from_facts(TransformerFacts("decoder", 8, 1024, 16, 16, 4096, 51200, 1024, True))
    result = search(model, spec.parallel, context_for(spec))
    assert result.candidates == 0
    assert "relax a fixed field" in _no_plan_message(spec, result, what_would_fit)
    with pytest.raises(PlanningError):
        raise PlanningError(_no_plan_message(spec, result, what_would_fit))
