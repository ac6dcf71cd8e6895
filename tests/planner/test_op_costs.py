"""The measured-operator time model: which operators a traced unit runs (trainplan.planner.op_uses),
their cost (trainplan.planner.cost.ops) and its use by the evaluation when the cluster has a table."""

from __future__ import annotations

import pytest

from trainplan import api
from trainplan.ir.cluster import OpCost
from trainplan.planner.cost.ops import OpUse, loss_time_s, op_time_s, ops_time_s
from trainplan.planner.model_costs import model_costs_from_graph

SMALL = {"layers": 2, "hidden": 64, "heads": 4, "vocab": 128, "seq_len": 32}


def spec(model: str = "gpt", args: dict | None = None, cluster: dict | None = None, parallel: dict | None = None,
         batch: int = 8):
    return api.spec_from_dict({
        "name": "ops", "model": {"catalogue": model, "args": args or SMALL}, "task": {"kind": "lm"},
        "training": {"global_batch": batch, "precision": "fp32", "optimizer": "adam", "steps": 1, "seed": 0},
        "cluster": cluster or {"preset": "cpu-local"}, "parallel": parallel or {}})


def uses(model: str, args: dict | None = None):
    return model_costs_from_graph(api.trace(spec(model, args))).units


def by_op(unit_ops) -> dict[str, OpUse]:
    return {u.op: u for u in unit_ops}


def test_a_gpt_block_runs_its_operators_per_sample() -> None:
    units = uses("gpt")
    block = by_op(units[1].ops)
    assert block["linear"].calls == 6 and block["linear"].grad
    b, s, h = 1, SMALL["seq_len"], SMALL["hidden"]
    # q, k, v, proj: 2·s·h·h each; fc and proj of the MLP: 2·s·h·4h each — per sample, sharded under TP
    assert block["linear"].units_sharded == pytest.approx(b * (4 * 2 * s * h * h + 2 * 2 * s * h * 4 * h))
    assert block["layer_norm"].calls == 2 and block["layer_norm"].units_replicated == 2 * s * h
    # inside the column-parallel MLP; the catalogue GPT's tanh GeLU is a kernel of its own
    assert block["gelu[approximate=tanh]"].units_sharded == s * 4 * h
    assert block["module_call"].calls == 12 and not block["module_call"].grad  # Block, ln_1, attn, q, k, v, ...
    assert block["scaled_dot_product_attention"].kind == "flop"
    assert block["transpose"].kind == "view"


def test_batch_independent_work_is_not_scaled() -> None:
    # llama's rotary tables (arange, outer, cos, sin) are computed once per forward whatever the batch,
    # and no gradient flows into them
    emb = [u for u in uses("llama", dict(SMALL, kv_heads=2)) if u.kind == "block"][0]
    ops = by_op(emb.ops)
    assert ops["cos"].units_constant > 0 and ops["cos"].units_replicated == 0 and ops["cos"].units_sharded == 0
    assert not ops["cos"].grad and not ops["arange"].grad


def test_op_time_is_fixed_plus_units_and_views_are_fixed_only() -> None:
    cost = OpCost(per="element", fwd_fixed_s=2e-6, fwd_per_unit_s=1e-9, bwd_fixed_s=5e-6, bwd_per_unit_s=3e-9)
    use = OpUse("gelu", "element", True, 2, 100.0, 400.0, 10.0)
    f, b = op_time_s(use, cost, micro_batch=4, tp=2)
    units = 4 * (100 + 400 / 2) + 10
    assert f == pytest.approx(2 * 2e-6 + units * 1e-9) and b == pytest.approx(2 * 5e-6 + units * 3e-9)
    assert op_time_s(OpUse("gelu", "element", False, 2, 100.0, 0.0, 0.0), cost, 1, 1)[1] == 0.0
    view = OpUse("transpose", "view", True, 3, 1e6, 0.0, 0.0)
    assert op_time_s(view, cost, 8, 1) == pytest.approx((3 * 2e-6, 3 * 5e-6))


def test_a_variant_uses_its_own_entry_else_the_operators() -> None:
    table = {"gelu": OpCost(per="element", fwd_fixed_s=1e-6), "gelu[approximate=tanh]": OpCost(per="element", fwd_fixed_s=3e-6)}
    assert ops_time_s((OpUse("gelu[approximate=tanh]", "element", False, 1, 0, 0, 0),), table, 1, 1)[0] == 3e-6
    assert ops_time_s((OpUse("gelu[approximate=none]", "element", False, 1, 0, 0, 0),), table, 1, 1)[0] == 1e-6


def test_a_single_sample_variant_applies_at_a_micro_batch_of_one_only() -> None:
    table = {"conv2d": OpCost(per="flop", fwd_fixed_s=60e-6), "conv2d[native]": OpCost(per="flop", fwd_fixed_s=10e-6)}
    conv = (OpUse("conv2d[native]", "flop", False, 1, 0, 0, 0),)
    assert ops_time_s(conv, table, 1, 1)[0] == pytest.approx(10e-6)
    assert ops_time_s(conv, table, 2, 1)[0] == pytest.approx(60e-6)  # oneDNN from two samples on
    assert ops_time_s(conv, {"conv2d": table["conv2d"]}, 1, 1)[0] == pytest.approx(60e-6)  # e.g. a GPU's table


def test_unmeasured_operators_use_their_kinds_fallback_or_fail_by_name() -> None:
    table = {"add": OpCost(per="element", fwd_fixed_s=1e-6), "linear": OpCost(per="flop", fwd_fixed_s=7e-6)}
    assert ops_time_s((OpUse("erfinv", "element", False, 1, 0, 0, 0),), table, 1, 1)[0] == pytest.approx(1e-6)
    assert ops_time_s((OpUse("bmm", "flop", False, 1, 0, 0, 0),), table, 1, 1)[0] == pytest.approx(7e-6)
    with pytest.raises(KeyError, match="'view'"):
        ops_time_s((OpUse("view", "view", False, 1, 0, 0, 0),), table, 1, 1)
    assert loss_time_s(table, 100.0, 1, 1) == (0.0, 0.0)


def table(scale: float = 1.0) -> dict:
    entry = {"fwd_fixed_s": 3e-6 * scale, "fwd_per_unit_s": 1e-9 * scale, "bwd_fixed_s": 8e-6 * scale,
             "bwd_per_unit_s": 2e-9 * scale}
    flop = {"fwd_fixed_s": 8e-6 * scale, "fwd_per_unit_s": 4e-12 * scale, "bwd_fixed_s": 2.5e-5 * scale,
            "bwd_per_unit_s": 8e-12 * scale}
    return {"add": {"per": "element", **entry}, "view": {"per": "element", **entry, "fwd_per_unit_s": 0.0},
            "linear": {"per": "flop", **flop}, "cross_entropy": {"per": "element", **entry}}


def calibrated(ops: dict | None = None, devices: int = 1) -> dict:
    free_link = {"bandwidth": 1e15, "latency": 0}  # so that compute alone differs between layouts
    return {"preset": "cpu-local", "devices_per_node": devices, "device": {"op_costs": {"fp32": ops or table()}},
            "intra_node": free_link, "inter_node": free_link}


def stage_times(s) -> tuple[float, float]:
    plan, _ = api.plan(s)
    return plan.stages[0].fwd_time_s, plan.stages[0].bwd_time_s


def test_the_plan_sums_the_measured_operators() -> None:
    fixed = {"dp": 1, "tp": 1, "pp": 1, "micro_batch": 2, "zero": 0, "recompute": "none"}
    s = spec(cluster=calibrated(), parallel=fixed, batch=2)
    mc = model_costs_from_graph(api.trace(s))
    ops = {k: OpCost.model_validate(v) for k, v in table().items()}
    want_f = sum(ops_time_s(u.ops, ops, 2, 1)[0] for u in mc.units)
    want_b = sum(ops_time_s(u.ops, ops, 2, 1)[1] for u in mc.units)
    lf, lb = loss_time_s(ops, mc.loss_bytes / 4, 2, 1)
    fwd, bwd = stage_times(s)
    assert fwd == pytest.approx(want_f + lf) and bwd == pytest.approx(want_b + lb)
    # twice as slow operators: twice the compute time
    assert stage_times(spec(cluster=calibrated(table(2.0)), parallel=fixed, batch=2)) == pytest.approx((2 * fwd, 2 * bwd))


def test_full_recompute_repeats_the_forward_and_tp_divides_the_sharded_work() -> None:
    base = {"dp": 1, "pp": 1, "micro_batch": 1, "zero": 0}
    f0, b0 = stage_times(spec(cluster=calibrated(), parallel=base | {"tp": 1, "recompute": "none"}, batch=1))
    f1, b1 = stage_times(spec(cluster=calibrated(), parallel=base | {"tp": 1, "recompute": "full"}, batch=1))
    blocks = [u for u in model_costs_from_graph(api.trace(spec())).units if u.kind == "block"]
    ops = {k: OpCost.model_validate(v) for k, v in table().items()}
    assert b1 - b0 == pytest.approx(sum(ops_time_s(u.ops, ops, 1, 1)[0] for u in blocks))
    work_only = {op: {k: (0.0 if "fixed" in k else v) for k, v in c.items()} for op, c in table().items()}
    w1, _ = stage_times(spec(cluster=calibrated(work_only), parallel=base | {"tp": 1, "recompute": "none"}, batch=1))
    w2, _ = stage_times(spec(cluster=calibrated(work_only, devices=2), parallel=base | {"tp": 2, "recompute": "none"},
                             batch=1))
    # the Megatron-sharded GEMMs, attention, the MLP's element-wise ops and the vocabulary-parallel head and
    # loss halve; norms and residual adds do not
    mc, ops = model_costs_from_graph(api.trace(spec())), {k: OpCost.model_validate(v) for k, v in work_only.items()}
    for t, got in ((1, w1), (2, w2)):
        want = sum(ops_time_s(u.ops, ops, 1, t)[0] for u in mc.units) + loss_time_s(ops, mc.loss_bytes / 4, 1, t)[0]
        assert got == pytest.approx(want, rel=1e-3)
    assert 0.5 * w1 < w2 < 0.8 * w1


def test_sharing_cores_slows_the_measured_compute_and_the_update() -> None:
    fixed = {"dp": 1, "tp": 1, "pp": 1, "micro_batch": 2, "zero": 0, "recompute": "none"}
    full = calibrated(dict(table(), **{"optimizer:adam": {"per": "element", "fwd_fixed_s": 2e-5, "fwd_per_unit_s": 1e-9}}))
    half = dict(full, device=dict(full["device"], compute_share=0.5))
    plans = [api.plan(spec(cluster=c, parallel=fixed, batch=2))[0] for c in (full, half)]
    (f1, b1), (f2, b2) = [(p.stages[0].fwd_time_s, p.stages[0].bwd_time_s) for p in plans]
    assert (f2, b2) == pytest.approx((2 * f1, 2 * b1))


def test_the_update_costs_each_parameter_tensor_and_element() -> None:
    from trainplan.planner import context_for
    from trainplan.planner.evaluate import StageCost
    from trainplan.planner.measured_time import optimizer_time
    from trainplan.planner.space import Layout

    adam = {"per": "element", "fwd_fixed_s": 2e-5, "fwd_per_unit_s": 1e-9}
    s = spec(cluster=dict(calibrated(dict(table(), **{"optimizer:adam": adam})), devices_per_node=4))
    mc = model_costs_from_graph(api.trace(s))
    ctx = context_for(api.resolve(s))
    last = len(mc.units) - 1
    tensors = sum(u.param_tensors for u in mc.units)
    stage = StageCost(((0, last),), 0, 0.0, 0.0, mc.params, None)  # type: ignore[arg-type]
    base = dict(tp=1, pp=1, micro_batch=1, num_microbatches=1, schedule="1f1b", virtual_stages=1,
                recompute="none", sequence_parallel=False)
    for dp, zero, per_rank_tensors, elements in ((1, 0, tensors, mc.params), (4, 1, tensors / 4, mc.params / 4),
                                                 (4, 3, tensors, mc.params / 4)):
        lay = Layout(dp=dp, zero=zero, **base)
        got = optimizer_time(ctx, mc, lay, stage, dp if zero else 1)
        assert got == pytest.approx(per_rank_tensors * 2e-5 + elements * 1e-9)
    assert tensors == 2 + 2 * 16 + 2  # wte, wpe; 16 per block (q, k, v, proj, fc, proj: w + b; 2 norms: w + b); ln_f (lm_head tied)


def test_fsdp_units_pay_their_calibrated_overhead_per_micro_batch() -> None:
    fixed = {"dp": 4, "tp": 1, "pp": 1, "micro_batch": 1, "zero": 3, "recompute": "none"}
    base = calibrated(devices=4)
    with_overhead = dict(base, device=dict(base["device"], fsdp_unit_overhead=1e-3, compute_share=0.5))
    without = dict(base, device=dict(base["device"], compute_share=0.5))
    (p0, _), (p1, _) = (api.plan(spec(cluster=c, parallel=fixed, batch=8)) for c in (without, with_overhead))
    units = SMALL["layers"] + 1  # every block and the root, as the runtime shards them
    assert p1.estimate.comm_time_s.dp - p0.estimate.comm_time_s.dp == pytest.approx(units * p0.num_microbatches * 1e-3 / 0.5)
    ddp = dict(fixed, zero=0)
    q0, q1 = (api.plan(spec(cluster=c, parallel=ddp, batch=8))[0] for c in (without, with_overhead))
    assert q0.estimate.step_time_s == pytest.approx(q1.estimate.step_time_s)  # DDP has no FSDP units


def test_tensor_parallel_layers_and_dtensor_parameters_are_counted_per_unit() -> None:
    units = uses("gpt")
    emb, block, head = units[0], units[1], units[-1]
    assert block.tp_layers == 6  # q, k, v, proj, fc, proj
    assert block.tp_param_tensors == 12  # their weights and biases (the row-parallel biases are replicated DTensors)
    assert emb.tp_layers == 1 and emb.tp_param_tensors == 1  # the vocabulary-parallel wte (wpe stays plain)
    assert head.tp_layers == 1 and head.tp_param_tensors == 0  # the head reads the tied wte, owned by the embedding


def test_dtensor_overhead_is_paid_per_layer_micro_batch_loss_and_parameter() -> None:
    fixed = {"dp": 2, "tp": 2, "pp": 1, "micro_batch": 1, "zero": 0, "recompute": "none"}
    base = calibrated(devices=4)
    share = 0.5
    over = {"module_fwd_s": 1e-3, "module_bwd_s": 2e-3, "loss_fwd_s": 4e-3, "loss_bwd_s": 8e-3,
            "param_step_s": {"adam": 1e-4}}
    without = dict(base, device=dict(base["device"], compute_share=share))
    with_overhead = dict(base, device=dict(base["device"], compute_share=share, tp_overhead=over))
    (p0, _), (p1, _) = (api.plan(spec(cluster=c, parallel=fixed, batch=8)) for c in (without, with_overhead))
    layers = 6 * SMALL["layers"] + 2  # every block's six, the embedding and the head
    per_micro_batch = layers * 3e-3 + 12e-3
    optimizer = (12 * SMALL["layers"] + 1) * 1e-4
    assert p1.estimate.step_time_s - p0.estimate.step_time_s == pytest.approx(
        (p0.num_microbatches * per_micro_batch + optimizer) / share)
    single = dict(fixed, dp=4, tp=1)
    q0, q1 = (api.plan(spec(cluster=c, parallel=single, batch=8))[0] for c in (without, with_overhead))
    assert q0.estimate.step_time_s == pytest.approx(q1.estimate.step_time_s)  # no DTensor at tp = 1
    tensors = 2 + 16 * SMALL["layers"] + 2  # every parameter tensor (test_the_update_costs_each_...)
    for zero in (2, 3):  # FSDP2 makes every parameter a DTensor: each one's update pays the dispatch
        fsdp = dict(single, zero=zero)
        r0, r1 = (api.plan(spec(cluster=c, parallel=fsdp, batch=8))[0] for c in (without, with_overhead))
        assert r1.estimate.update_time_s - r0.estimate.update_time_s == pytest.approx(tensors * 1e-4 / share)
        assert r1.estimate.step_time_s - r0.estimate.step_time_s == pytest.approx(tensors * 1e-4 / share)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputed_blocks_pay_the_checkpointing_machinery_per_saved_tensor(mode: str) -> None:
    """The machinery is charged per activation tensor a block's ops save (counted per op), not per
    traced operator: the catalogue GPT block's 18 are the two norms' input, mean and rstd (6), the
    q/k/v projections' shared input (3), attention's q, k, v, output and log-sum-exp (5), and the
    output projection's, the MLP's two products' and the GeLU's inputs (4)."""
    fixed = {"dp": 1, "tp": 1, "pp": 1, "micro_batch": 2, "zero": 0, "recompute": mode}
    machinery = {"per": "element", "fwd_fixed_s": 1e-5, "bwd_fixed_s": 3e-5}
    (f0, b0), (f1, b1) = (stage_times(spec(cluster=calibrated(ops), parallel=fixed, batch=2))
                          for ops in (table(), dict(table(), **{f"recompute:{mode}": machinery})))
    blocks = [u for u in uses("gpt") if u.kind == "block"]
    assert len(blocks) == SMALL["layers"] and all(u.saved_tensors == 18 for u in blocks)
    operators = sum(use.calls for use in blocks[0].ops if use.op != "module_call")
    assert operators > 18  # views, the residual adds, dropout: they save nothing
    saved = 18 * SMALL["layers"]
    assert f1 - f0 == pytest.approx(saved * 1e-5) and b1 - b0 == pytest.approx(saved * 3e-5)
    other = "selective" if mode == "full" else "full"
    unused = dict(table(), **{f"recompute:{other}": machinery})
    assert stage_times(spec(cluster=calibrated(unused), parallel=fixed, batch=2)) == pytest.approx((f0, b0))
