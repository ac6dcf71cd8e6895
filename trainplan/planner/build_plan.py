"""Turn the search's winner into an executable :class:`~trainplan.ir.plan.Plan`."""

from __future__ import annotations

from trainplan.ir.plan import (
    Alternative,
    CommTime,
    Estimate,
    MemoryBreakdown,
    Mesh,
    ModelSummary,
    Plan,
    SearchStats,
    StagePlan,
    spec_hash,
)
from trainplan.ir.spec import AUTO, Spec
from trainplan.planner.evaluate import Context, Evaluation, StageCost
from trainplan.planner.explain import memory_reason, slower_reason
from trainplan.planner.model_costs import ModelCosts
from trainplan.planner.search import SearchResult

# Megatron-LM tensor-parallel styles (Shoeybi et al. 2019, Sec. 3) for the catalogue transformers,
# whose module names gpt, llama and bert share; keys are torch parallelize_module patterns.
CATALOGUE_TP_STYLES = {
    "wte": "vocab",
    "layers.*.attn.q": "colwise",
    "layers.*.attn.k": "colwise",
    "layers.*.attn.v": "colwise",
    "layers.*.attn.proj": "rowwise",
    "layers.*.mlp.gate": "colwise",
    "layers.*.mlp.fc": "colwise",
    "layers.*.mlp.proj": "rowwise",
    "lm_head": "colwise",
}


def tp_styles(spec: Spec, model: ModelCosts, tp: int) -> dict[str, str]:
    if tp == 1:
        return {}
    names = {m for u in model.units for m in u.modules}
    styles = dict(CATALOGUE_TP_STYLES)
    if model.facts is not None and not model.facts.gated_mlp:
        styles.pop("layers.*.mlp.gate")
    if "lm_head" not in names and "head.lm_head" in names:  # bert's MLM head
        styles["head.lm_head"] = styles.pop("lm_head")
    return styles


def _breakdown(stage: StageCost) -> MemoryBreakdown:
    mem = stage.memory
    return MemoryBreakdown(
        params=int(mem.params),
        grads=int(mem.grads),
        optimizer=int(mem.optimizer),
        activations=int(mem.activations),
        overhead=int(mem.transient + mem.reserved),
    )


def _stage_plans(ev: Evaluation, model: ModelCosts, mesh: Mesh) -> list[StagePlan]:
    lay = ev.layout
    chunks = sorted(
        ((c * lay.pp + s.device, rng, s) for s in ev.stages for c, rng in enumerate(s.ranges)), key=lambda x: x[0]
    )
    plans = []
    for index, (i, j), stage in chunks:
        units = model.units[i : j + 1]
        ranks = [mesh.rank(stage.device, d, t) for d in range(mesh.dp) for t in range(mesh.tp)]
        share = 1.0 / len(stage.ranges)
        plans.append(
            StagePlan(
                index=index,
                units=[u.name for u in units],
                modules=[m for u in units for m in u.modules],
                ranks=ranks,
                params=int(sum(u.params for u in units)),
                memory_bytes=int(stage.memory.total),
                memory_breakdown=_breakdown(stage),
                fwd_time_s=stage.fwd * share,
                bwd_time_s=stage.bwd * share,
            )
        )
    return plans


def _estimate(ev: Evaluation, model: ModelCosts, spec: Spec, ctx: Context) -> Estimate:
    cluster, t = spec.cluster, ev.step_time
    batch = spec.training.global_batch
    tokens_per_s = batch * ctx.tokens_per_sample / t
    model_flops = model.flops_per_sample * batch / t / cluster.world_size
    time_to_train = spec.training.tokens / tokens_per_s if spec.training.tokens else None
    run_s = time_to_train if time_to_train is not None else t * spec.training.steps
    dev = cluster.device
    return Estimate(
        step_time_s=t,
        samples_per_s=batch / t,
        tokens_per_s=tokens_per_s,
        tflops_per_device=model_flops / 1e12,
        mfu=model_flops / dev.peak(ctx.dtype),
        memory_per_device_bytes=int(ev.peak_memory),
        memory_breakdown=_breakdown(ev.stages[ev.peak_stage]),
        comm_time_s=CommTime(dp=ev.dp_exposed_s, tp=ev.tp_s, pp=ev.pp_s),
        bubble_fraction=ev.bubble_fraction,
        time_to_train_s=time_to_train,
        energy_kwh=cluster.world_size * dev.power_w * run_s / 3.6e6 if dev.power_w is not None else None,
        cost=cluster.world_size * dev.price_per_hour * run_s / 3600 if dev.price_per_hour is not None else None,
    )


def _alternatives(result: SearchResult, limit: float, keep: int) -> list[Alternative]:
    best = result.ranked[0]
    rows = [(ev, True, slower_reason(ev, best)) for ev in result.ranked[1 : keep + 1]]
    rows += [(ev, False, memory_reason(ev, limit)) for ev in result.infeasible[:3]]
    return [
        Alternative(rank=k + 1, layout=ev.layout.describe(), step_time_s=ev.step_time,
                    memory_per_device_bytes=int(ev.peak_memory), fits=fits, reason=reason)
        for k, (ev, fits, reason) in enumerate(rows)
    ]


def _notes(spec: Spec, ev: Evaluation) -> list[str]:
    par, notes = spec.parallel, []
    if par.allreduce == AUTO and ev.layout.dp > 1:
        notes.append(f"allreduce: {ev.allreduce} chosen by the alpha-beta model for the data-parallel gradients")
    if par.sync == AUTO:
        notes.append("sync: synchronous (async and local SGD change the training result; set parallel.sync to use them)")
    if par.compression == AUTO:
        notes.append("compression: none (lossy; set parallel.compression to trade accuracy for bandwidth)")
    return notes


def build_plan(spec: Spec, model: ModelCosts, result: SearchResult, ctx: Context, keep: int = 10) -> Plan:
    ev = result.ranked[0]
    lay = ev.layout
    mesh = Mesh(pp=lay.pp, dp=lay.dp, tp=lay.tp)
    par = spec.parallel
    return Plan(
        spec=spec,
        spec_hash=spec_hash(spec),
        mesh=mesh,
        micro_batch=lay.micro_batch,
        num_microbatches=lay.num_microbatches,
        schedule=lay.schedule,
        virtual_stages=lay.virtual_stages,
        zero=lay.zero,
        recompute=lay.recompute,
        sequence_parallel=lay.sequence_parallel,
        allreduce=ev.allreduce if par.allreduce == AUTO else par.allreduce,
        sync="sync" if par.sync == AUTO else par.sync,
        compression="none" if par.compression == AUTO else par.compression,
        tp_styles=tp_styles(spec, model, lay.tp),
        stages=_stage_plans(ev, model, mesh),
        model=ModelSummary(params=int(model.params), flops_per_sample=model.flops_per_sample, layers=model.blocks),
        estimate=_estimate(ev, model, spec, ctx),
        alternatives=_alternatives(result, float(spec.cluster.device.memory), keep),
        search=SearchStats(candidates=result.candidates, evaluated=result.evaluated, feasible=result.feasible),
        notes=_notes(spec, ev),
    )
