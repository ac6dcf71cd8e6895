"""Per-unit costs of :mod:`trainplan.planner.evaluate`: what each unit is charged, forward and backward."""

from __future__ import annotations

import pytest

from trainplan.ir.cluster import load_preset
from trainplan.ir.facts import TransformerFacts
from trainplan.planner import cost
from trainplan.planner.evaluate import Context, unit_times
from trainplan.planner.model_costs import model_costs_from_facts
from trainplan.planner.space import Layout

GPT = TransformerFacts("decoder", 4, 1024, 16, 16, 4096, 51200, 2048, True)


def _ctx(nodes: int = 1) -> Context:
    return Context(load_preset("a100-80g", nodes=nodes), "bf16", "adam", 64, GPT.seq_len, "auto")


def _layout(**kw) -> Layout:
    base = dict(dp=1, tp=1, pp=1, micro_batch=2, num_microbatches=1, schedule="1f1b", virtual_stages=1, zero=0,
                recompute="none", sequence_parallel=False)
    base.update(kw)
    return Layout(**base)


# ------------------------------------------------------------------- 1. embedding / LM head TP comm


@pytest.mark.parametrize("tp", [2, 8])
def test_vocab_parallel_embedding_all_reduces_in_the_forward_only(tp):
    """Shoeybi et al. 2019, Sec. 3: the embedding's ``g`` all-reduces forward, its backward is local."""
    ctx, lay = _ctx(), _layout(tp=tp)
    ut = unit_times(model_costs_from_facts(GPT), lay, ctx)
    link = cost.group_link(ctx.cluster, tp, 1)
    ar = cost.ring_allreduce_time_s(2.0 * GPT.seq_len * GPT.hidden * 2, tp, link)
    assert ut.fwd[0] == pytest.approx(ar)
    assert ut.bwd[0] == 0.0  # the embedding has no compute and no backward communication
    assert ut.tp[0] == pytest.approx(ar)


@pytest.mark.parametrize("tp", [2, 8])
def test_lm_head_all_reduces_its_input_gradient_in_the_backward_only(tp):
    """Column-parallel head with a parallel cross-entropy: ``f`` all-reduces the input gradient in
    the backward; the forward exchanges only per-token scalars (three fp32 all-reduces of b·s)."""
    ctx = _ctx()
    model = model_costs_from_facts(GPT)
    with_tp, without = unit_times(model, _layout(tp=tp), ctx), unit_times(model, _layout(tp=1), ctx)
    link = cost.group_link(ctx.cluster, tp, 1)
    hidden_ar = cost.ring_allreduce_time_s(2.0 * GPT.seq_len * GPT.hidden * 2, tp, link)
    scalars = 3 * cost.ring_allreduce_time_s(2.0 * GPT.seq_len * 4, tp, link)
    assert with_tp.tp[-1] == pytest.approx(hidden_ar + scalars)
    # Compute scales with 1/tp; the communication sits on the side Megatron-LM puts it.
    assert with_tp.fwd[-1] - scalars == pytest.approx(without.fwd[-1] / tp, rel=0.05)
    assert with_tp.bwd[-1] - hidden_ar == pytest.approx(without.bwd[-1] / tp, rel=0.05)


def test_edge_comm_with_sequence_parallelism_splits_the_all_reduce():
    """Korthikanti et al. 2022, Sec. 4.2.2: reduce-scatter / all-gather, together one all-reduce's volume."""
    link = cost.group_link(load_preset("a100-80g"), 8, 1)
    f_emb, b_emb = cost.tp_edge_comm_time("embedding", GPT, 2, 8, link, True, 2)
    nbytes = 2.0 * GPT.seq_len * GPT.hidden * 2
    assert f_emb == pytest.approx(cost.reduce_scatter_time_s(nbytes, 8, link))
    assert b_emb == pytest.approx(cost.all_gather_time_s(nbytes, 8, link))
    f_head, b_head = cost.tp_edge_comm_time("head", GPT, 2, 8, link, True, 2)
    assert b_head == pytest.approx(cost.reduce_scatter_time_s(nbytes, 8, link))
    assert f_head > cost.all_gather_time_s(nbytes, 8, link)
    assert cost.tp_edge_comm_time("head", GPT, 2, 1, link, True, 2) == (0.0, 0.0)


# ------------------------------------------------------------------------------ 2. ZeRO-3 traffic


def test_zero3_volume_is_the_papers_one_and_a_half_at_one_microbatch():
    """Rajbhandari et al. 2020, Sec. 7.2.2: 3Ψ (reduce-scatter + two all-gathers) against DP's 2Ψ;
    with m micro-batches FSDP2 (reshard_after_forward=True) gathers 2m times: (1 + 2m)Ψ."""
    from trainplan.planner.cost.comm import LinkCost

    link, n, psi = LinkCost(100e9, 0.0, "inter"), 64, 1e10  # no latency: pure volume
    baseline = cost.ring_allreduce_time_s(psi, n, link)
    rs, gathers = cost.zero3_comm_time_s(psi, psi, n, link, 1)
    assert (rs + gathers) / baseline == pytest.approx(1.5)
    rs4, gathers4 = cost.zero3_comm_time_s(psi, psi, n, link, 4)
    assert rs4 == rs and (rs4 + gathers4) / baseline == pytest.approx((1 + 2 * 4) / 2)


def test_zero3_step_exposes_one_reduce_scatter_and_the_gathers_compute_cannot_hide():
    """A parameter-heavy, compute-light chain: ZeRO-3 exposes the gradient reduce-scatter (no
    all-reduce: the shards are not gathered after the update) plus the 2m all-gathers beyond compute."""
    from trainplan.planner.evaluate import evaluate
    from trainplan.planner.gradient_sync import dp_exposed
    from trainplan.planner.model_costs import ModelCosts, UnitCost

    units = tuple(UnitCost(f"u{i}", "other", (f"m{i}",), 5e8, 1e6, 2e6, 1e3, 1e3) for i in range(2))
    model = ModelCosts(units, None, 1e9)
    ctx = _ctx(nodes=4)
    lay = _layout(dp=32, micro_batch=1, num_microbatches=2, zero=3)
    ev = evaluate(model, lay, ctx)
    link = cost.group_link(ctx.cluster, 32, 1)
    rs = cost.reduce_scatter_time_s(1e9 * 2, 32, link)
    gathers = 2 * 2 * cost.all_gather_time_s(1e9 * 2, 32, link)
    stage = ev.stages[0]
    exposed = cost.dp_overlap_exposed_time(rs, stage.bwd, 25 * 2**20, 1e9 * 2) + gathers - 2 * (stage.fwd + stage.bwd)
    assert dp_exposed(ctx, lay, list(ev.stages))[0] == pytest.approx(exposed)
    assert ev.dp_exposed_s < cost.ring_allreduce_time_s(1e9 * 2, 32, link) + gathers - 2 * (stage.fwd + stage.bwd)


# ------------------------------------------------------------------- 3. interleaved virtual stages


def _interleaved_gpt():  # noqa: ANN202 - (TransformerFacts, Spec)
    """An 8-layer GPT on one A100 node with pp=2 interleaved over 2 chunks per rank (uneven chunks)."""
    from trainplan.ir.loading import validate
    from trainplan.ir.spec import Spec

    facts = TransformerFacts("decoder", 8, 1024, 16, 16, 4096, 51200, 1024, True)
    return facts, validate(Spec, {
        "name": "gpt-small",
        "model": {"catalogue": "gpt", "args": {"layers": 8, "hidden": 1024, "heads": 16, "vocab": 51200, "seq_len": 1024}},
        "task": {"kind": "lm", "seq_len": 1024, "vocab": 51200},
        "training": {"global_batch": 64, "precision": "bf16", "optimizer": "adam", "steps": 10},
        "cluster": {"preset": "a100-80g", "nodes": 1},
        "parallel": {"tp": 1, "pp": 2, "schedule": "interleaved", "virtual_stages": 2},
    })


def test_interleaved_plan_reports_each_virtual_stages_own_time():
    """Each chunk's fwd/bwd is the sum of its own units, not its pipeline rank's average."""
    from trainplan.planner import context_for
    from trainplan.planner.build_plan import build_plan
    from trainplan.planner.search import search

    facts, spec = _interleaved_gpt()
    model, ctx = model_costs_from_facts(facts), context_for(spec)
    result = search(model, spec.parallel, ctx)
    plan = build_plan(spec, model, result, ctx)
    ut = unit_times(model, result.ranked[0].layout, ctx)
    names = [u.name for u in model.units]
    assert len(plan.stages) == 4
    for stage in plan.stages:
        idx = [names.index(n) for n in stage.units]
        assert stage.fwd_time_s == pytest.approx(sum(ut.fwd[i] for i in idx))
        assert stage.bwd_time_s == pytest.approx(sum(ut.bwd[i] for i in idx))
    # rank 1 holds chunk 1 (two layers) and chunk 3 (two layers and the LM head): they differ
    assert plan.stages[3].fwd_time_s > plan.stages[1].fwd_time_s
    for rank, stage in enumerate(result.ranked[0].stages):
        assert plan.stages[rank].fwd_time_s + plan.stages[rank + 2].fwd_time_s == pytest.approx(stage.fwd)


# ------------------------------------------------------------------- 4. kernels of untyped units


def _cpu(kernel_launch: str = "20 us") -> Context:
    cluster = load_preset("cpu-local", nodes=1, devices_per_node=1, device={"kernel_launch": kernel_launch})
    return Context(cluster, "fp32", "adam", 8, 1, "auto")


def test_units_without_facts_pay_their_kernels_once_forward_twice_backward():
    from trainplan.planner.model_costs import ModelCosts, UnitCost

    unit = UnitCost("u0", "other", ("m0",), 1e3, 1e6, 2e6, 1e3, 1e3, kernels=7)
    model, ctx = ModelCosts((unit,), None, 1e3), _cpu()
    dev = ctx.cluster.device
    for mb in (1, 4):
        ut = unit_times(model, _layout(micro_batch=mb), ctx)
        assert ut.fwd[0] == pytest.approx(cost.compute_time_s(1e6 * mb, dev, "fp32", dev.efficiency) + 7 * 20e-6)
        assert ut.bwd[0] == pytest.approx(cost.compute_time_s(2e6 * mb, dev, "fp32", dev.efficiency) + 14 * 20e-6)


def test_per_sample_time_falls_with_the_micro_batch_when_kernels_cost_something():
    """Without a per-kernel cost every micro-batch size ties; with it, larger micro-batches amortise it."""
    from trainplan.planner.model_costs import ModelCosts, UnitCost

    unit = UnitCost("u0", "other", ("m0",), 1e3, 1e5, 2e5, 1e3, 1e3, kernels=10)
    model = ModelCosts((unit,), None, 1e3)
    per_sample = [sum(unit_times(model, _layout(micro_batch=mb), _cpu()).fwd) / mb for mb in (1, 2, 8)]
    assert per_sample[0] > per_sample[1] > per_sample[2]
    flat = [sum(unit_times(model, _layout(micro_batch=mb), _cpu("0 s")).fwd) / mb for mb in (1, 2, 8)]
    assert flat == pytest.approx([flat[0]] * 3)


def test_traced_units_count_the_ops_that_launch_work():
    """The mlp's units: Linear and ReLU launch kernels, the flatten view does not."""
    from trainplan.ir.spec import ModelSpec
    from trainplan.models.registry import build_model
    from trainplan.passes import build_graph
    from trainplan.planner.model_costs import launches_kernel, model_costs_from_graph, unit_kernels

    graph = build_graph(build_model(ModelSpec(catalogue="mlp", args={"input_shape": [2, 8], "hidden": 16, "layers": 2,
                                                                     "classes": 3})))
    model = model_costs_from_graph(graph)
    for unit, traced in zip(model.units, graph.units):
        nodes = graph.unit_nodes(traced)
        assert unit.kernels == unit_kernels(nodes) == sum(1 for n in nodes if launches_kernel(n))
    targets = {n.target: launches_kernel(n) for n in graph.nodes}
    views = [t for t in targets if "flatten" in t or "view" in t or "reshape" in t]
    assert views and not any(targets[t] for t in views)
    assert all(targets[t] for t in targets if "linear" in t.lower() or "relu" in t.lower())
    assert sum(u.kernels for u in model.units) == sum(targets[n.target] for n in graph.nodes) > 0


def test_the_search_simulates_each_chunk_with_its_own_time():
    """The refinement by simulation times interleaved chunks as the plan reports them, not as rank averages."""
    from trainplan.planner import context_for
    from trainplan.planner.schedule import compiled, simulate
    from trainplan.planner.search import search, simulate_evaluation

    facts, spec = _interleaved_gpt()
    ev = search(model_costs_from_facts(facts), spec.parallel, context_for(spec)).ranked[0]
    lay = ev.layout
    timeline = simulate_evaluation(ev)
    assert timeline.busy == pytest.approx([lay.num_microbatches * (s.fwd + s.bwd) for s in ev.stages])
    own = [[list(s.chunk_fwd), list(s.chunk_bwd)] for s in ev.stages]
    assert any(f[0] != pytest.approx(f[1]) for f, _ in own)  # uneven chunks: the head is on the last one
    averaged = simulate(compiled(lay.schedule, lay.pp, lay.num_microbatches, 2),
                        [[s.fwd / 2] * 2 for s in ev.stages], [[s.bwd / 2] * 2 for s in ev.stages], ev.p2p_s)
    assert timeline.makespan != pytest.approx(averaged.makespan, rel=1e-9)


# ------------------------------------------------------------------- 5. data-parallel collectives as the runtime runs them


def test_fsdp_collectives_pay_latency_per_unit_at_the_same_volume():
    link = load_preset("cpu-local").intra_node
    one = cost.zero3_comm_time_s(8e6, 8e6, 4, link, 2)
    five = cost.zero3_comm_time_s(8e6, 8e6, 4, link, 2, collectives=5)
    assert five[0] - one[0] == pytest.approx(4 * 3 * link.latency)  # 4 more reduce-scatters of n-1 = 3 hops
    assert five[1] - one[1] == pytest.approx(2 * 2 * 4 * 3 * link.latency)  # 2 gathers x 2 micro-batches x 4 more
    zero2 = cost.zero3_comm_time_s(8e6, 8e6, 4, link, 2, collectives=5, gathers_per_microbatch=1)
    assert zero2[1] == pytest.approx(five[1] / 2)


def test_zero1_broadcasts_each_owners_bucket_after_the_step():
    link = load_preset("cpu-local").intra_node
    t = cost.zero1_broadcast_time_s(4e6, 4, link)
    assert t == pytest.approx(4 * 2 * link.latency + 4e6 / link.bandwidth)
    assert cost.zero1_broadcast_time_s(4e6, 1, link) == 0.0


def test_on_gloo_nothing_hides_the_gradient_exchange():
    """CPU processes move and sum gradients on the cores that compute: exposed time = the whole exchange."""
    from trainplan.planner.evaluate import evaluate
    from trainplan.planner.gradient_sync import dp_exposed, dp_gradient_time

    model = model_costs_from_facts(GPT)  # ~0.4 GB of fp32 gradients: many DDP buckets to overlap on GPUs
    ctx = Context(cluster=load_preset("cpu-local"), precision="fp32", optimizer="adam", global_batch=16,
                  tokens_per_sample=GPT.seq_len, allreduce="native")
    lay = _layout(dp=4, micro_batch=4)
    stages = list(evaluate(model, lay, ctx).stages)
    exposed, algo, _, _ = dp_exposed(ctx, lay, stages, model)
    assert exposed == pytest.approx(dp_gradient_time(ctx, stages[0].params, lay, algo))
    gpu = Context(cluster=load_preset("a100-80g"), precision="fp32", optimizer="adam", global_batch=16,
                  tokens_per_sample=GPT.seq_len, allreduce="native")
    gpu_stages = list(evaluate(model, lay, gpu).stages)
    assert dp_exposed(gpu, lay, gpu_stages, model)[0] < dp_gradient_time(gpu, gpu_stages[0].params, lay, algo)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_ddp_syncs_add_up_down_a_pipeline_fsdps_overlap(zero):
    """Under DDP each stage reduces its gradients inside its last backward, before the input gradient
    goes back (torch pipelining's ``backward_maybe_with_nosync``): the exposed syncs of the stages add
    up. FSDP2 reduces after the schedule on every stage at once: the slowest stage's counts."""
    from trainplan.planner.evaluate import evaluate
    from trainplan.planner.gradient_sync import ddp_syncs_in_chain, dp_exposed

    model = model_costs_from_facts(GPT)
    ctx = Context(cluster=load_preset("cpu-local"), precision="fp32", optimizer="adam", global_batch=16,
                  tokens_per_sample=GPT.seq_len, allreduce="native")
    lay = _layout(dp=2, pp=2, zero=zero, micro_batch=1, num_microbatches=8)
    stages = list(evaluate(model, lay, ctx).stages)
    per_stage = [dp_exposed(ctx, lay, [s], model)[0] for s in stages]
    assert len(per_stage) == 2 and min(per_stage) > 0
    exposed = dp_exposed(ctx, lay, stages, model)[0]
    assert ddp_syncs_in_chain(ctx, lay) == (zero in (0, 1))
    if zero == 0:
        assert exposed == pytest.approx(sum(per_stage))
    elif zero in (2, 3):
        assert exposed == pytest.approx(max(per_stage))
    assert not ddp_syncs_in_chain(ctx, _layout(dp=2, pp=1, zero=zero))  # no pipeline: one stage
    assert not ddp_syncs_in_chain(ctx, _layout(dp=2, tp=2, pp=2, zero=zero))  # TP: FSDP2's replicate


def test_tied_parameters_across_pipeline_ranks_sum_their_gradients_each_step():
    """A tied embedding and LM head on two pipeline ranks all-reduce the tied gradient between the two
    holders once per step (``runtime.pipeline.TiedSync``); on one rank, or untied, nothing."""
    from dataclasses import replace

    from trainplan.planner.evaluate import evaluate, prefix_sums, tied_sync_s

    ctx = Context(cluster=load_preset("cpu-local"), precision="fp32", optimizer="adam", global_batch=16,
                  tokens_per_sample=GPT.seq_len, allreduce="native")
    tied, untied = model_costs_from_facts(GPT), model_costs_from_facts(replace(GPT, tied_embeddings=False))
    for tp in (1, 2):
        lay = _layout(dp=2, pp=2, tp=tp, micro_batch=1, num_microbatches=8)
        ev = evaluate(tied, lay, ctx)
        px = prefix_sums(tied, unit_times(tied, lay, ctx))
        link = cost.group_link(ctx.cluster, 2, 2 * tp)
        expected = cost.ring_allreduce_time_s(GPT.vocab * GPT.hidden / tp * 4, 2, link)
        assert tied_sync_s(ctx, lay, px, list(ev.stages)) == pytest.approx(expected)
    one = _layout(dp=2, micro_batch=1, num_microbatches=8)
    assert tied_sync_s(ctx, one, prefix_sums(tied, unit_times(tied, one, ctx)), list(evaluate(tied, one, ctx).stages)) == 0
    lay = _layout(dp=2, pp=2, micro_batch=1, num_microbatches=8)
    assert tied_sync_s(ctx, lay, prefix_sums(untied, unit_times(untied, lay, ctx)),
                       list(evaluate(untied, lay, ctx).stages)) == 0


@pytest.mark.parametrize("preset", ["cpu-local", "a100-80g"])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("pp", [1, 2])
def test_the_dp_phases_are_parts_of_the_exposed_time(preset, zero, pp):
    """Where the exposed data-parallel time lands (``DpPhases``, for the runtime's phase timers): the
    parts never exceed the whole; FSDP2's gathers go to the forward (and ZeRO-3's second gather to
    the backward) in the proportion not hidden behind compute; ZeRO-1's broadcast to the update."""
    from trainplan.planner.evaluate import evaluate
    from trainplan.planner.gradient_sync import dp_exposed, fsdp_phases

    model = model_costs_from_facts(GPT)
    ctx = Context(cluster=load_preset(preset), precision="fp32", optimizer="adam", global_batch=16,
                  tokens_per_sample=GPT.seq_len, allreduce="native")
    lay = _layout(dp=2, pp=pp, zero=zero, micro_batch=1, num_microbatches=8)
    ev = evaluate(model, lay, ctx)
    dp = dp_exposed(ctx, lay, list(ev.stages), model)
    assert ev.dp_phases == dp.phases and ev.dp_exposed_s == dp.seconds
    forward, backward, update = dp.phases
    assert min(dp.phases) >= 0 and forward + backward + update <= dp.seconds * (1 + 1e-12)
    assert (update > 0) == (zero == 1)
    if preset == "cpu-local":  # gloo: nothing hidden
        assert (forward > 0) == (zero in (2, 3)) and (backward > 0) == (zero == 3)
    if zero != 3:
        assert backward == 0.0
    # the split itself: one gather per micro-batch before the forward, ZeRO-3's second before the backward
    assert fsdp_phases(8.0, 2.0, 2, 1.0) == (5.0, 5.0, 0.0)
    assert fsdp_phases(8.0, 2.0, 1, 0.5) == (4.5, 0.5, 0.0)
    assert fsdp_phases(0.0, 0.0, 1, 0.0) == (0.0, 0.0, 0.0)
