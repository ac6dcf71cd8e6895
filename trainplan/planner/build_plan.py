"""Turn the search's winner into an executable :class:`~trainplan.ir.plan.Plan`."""

from __future__ import annotations

import math

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
from trainplan.ir.spec import AUTO, CommSpec, Spec
from trainplan.planner.evaluate import Context, Evaluation, StageCost
from trainplan.planner.gradient_sync import allreduce_reason, hookable
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


# The same styles for the Hugging Face families, by module path inside trainplan's wrapper
# (trainplan.models.hf). T5 has none: its facts are absent, so tp stays 1. ViT's patch embedding
# (a Conv2d), position embeddings and classifier stay replicated. GPT-2's layers are transformers'
# Conv1D (weight (in, out), the transpose of a Linear's), which the runtime's styles shard on the
# matching dimensions; its c_attn fuses q, k and v into one (h, 3h) projection, so it is "qkv":
# column-parallel with each rank taking its own heads' columns of each of q, k and v.
_HF_ROTARY_TP_STYLES = {
    "hf.model.embed_tokens": "vocab",
    "hf.model.layers.*.self_attn.q_proj": "colwise",
    "hf.model.layers.*.self_attn.k_proj": "colwise",
    "hf.model.layers.*.self_attn.v_proj": "colwise",
    "hf.model.layers.*.self_attn.o_proj": "rowwise",
    "hf.model.layers.*.mlp.gate_proj": "colwise",
    "hf.model.layers.*.mlp.up_proj": "colwise",
    "hf.model.layers.*.mlp.down_proj": "rowwise",
    "hf.lm_head": "colwise",
}
HF_TP_STYLES = {
    "gpt2": {
        "hf.transformer.wte": "vocab",
        "hf.transformer.h.*.attn.c_attn": "qkv",
        "hf.transformer.h.*.attn.c_proj": "rowwise",
        "hf.transformer.h.*.mlp.c_fc": "colwise",
        "hf.transformer.h.*.mlp.c_proj": "rowwise",
        "hf.lm_head": "colwise",
    },
    "llama": _HF_ROTARY_TP_STYLES,
    "mistral": _HF_ROTARY_TP_STYLES,
    "qwen2": _HF_ROTARY_TP_STYLES,
    "bert": {
        "hf.bert.embeddings.word_embeddings": "vocab",
        "hf.bert.encoder.layer.*.attention.self.query": "colwise",
        "hf.bert.encoder.layer.*.attention.self.key": "colwise",
        "hf.bert.encoder.layer.*.attention.self.value": "colwise",
        "hf.bert.encoder.layer.*.attention.output.dense": "rowwise",
        "hf.bert.encoder.layer.*.intermediate.dense": "colwise",
        "hf.bert.encoder.layer.*.output.dense": "rowwise",
        "hf.cls.predictions.decoder": "colwise",
    },
    "vit": {
        "hf.vit.layers.*.attention.q_proj": "colwise",
        "hf.vit.layers.*.attention.k_proj": "colwise",
        "hf.vit.layers.*.attention.v_proj": "colwise",
        "hf.vit.layers.*.attention.o_proj": "rowwise",
        "hf.vit.layers.*.mlp.fc1": "colwise",
        "hf.vit.layers.*.mlp.fc2": "rowwise",
    },
}


def model_tp_styles(hf_arch: str | None, modules: set[str], gated_mlp: bool) -> dict[str, str]:
    """The styles tensor parallelism applies to a model: its Hugging Face family's, or the catalogue's.

    ``modules``: the module paths of the model's units (bert's MLM head is unit ``head``, its output
    layer ``head.lm_head``); ``gated_mlp``: whether the MLP has a gate projection. The memory model
    (:func:`trainplan.planner.model_costs.tp_replicated_params`) counts what these styles shard.
    """
    if hf_arch is not None:
        return dict(HF_TP_STYLES.get(hf_arch, {}))
    styles = dict(CATALOGUE_TP_STYLES)
    if not gated_mlp:
        styles.pop("layers.*.mlp.gate")
    if "lm_head" not in modules and ("head.lm_head" in modules or "head" in modules):  # bert's MLM head (unit "head")
        styles["head.lm_head"] = styles.pop("lm_head")
    return styles


def tp_styles(spec: Spec, model: ModelCosts, tp: int) -> dict[str, str]:
    if tp == 1:
        return {}
    hf_arch = spec.model.hf.arch if spec.model.hf is not None else None
    gated = model.facts is None or model.facts.gated_mlp
    return model_tp_styles(hf_arch, {m for u in model.units for m in u.modules}, gated)


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
        ((c * lay.pp + s.device, c, rng, s) for s in ev.stages for c, rng in enumerate(s.ranges)), key=lambda x: x[0]
    )
    plans = []
    for index, c, (i, j), stage in chunks:
        units = model.units[i : j + 1]
        ranks = [mesh.rank(stage.device, d, t) for d in range(mesh.dp) for t in range(mesh.tp)]
        plans.append(
            StagePlan(
                index=index,
                units=[u.name for u in units],
                modules=[m for u in units for m in u.modules],
                ranks=ranks,
                params=int(sum(u.params for u in units)),
                memory_bytes=int(stage.memory.total),
                memory_breakdown=_breakdown(stage),
                fwd_time_s=stage.chunk_fwd[c],  # this virtual stage's own time, not its rank's average
                bwd_time_s=stage.chunk_bwd[c],
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
        comm_time_s=CommTime(dp=ev.dp_exposed_s, dp_in_forward=ev.dp_phases.forward, dp_in_backward=ev.dp_phases.backward,
                             dp_in_update=ev.dp_phases.update, tp=ev.tp_s, pp=ev.pp_s),
        bubble_fraction=ev.bubble_fraction,
        update_time_s=ev.optimizer_s,
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


def _notes(spec: Spec, ev: Evaluation, ctx: Context) -> list[str]:
    par, notes = spec.parallel, []
    if par.allreduce == AUTO and ev.layout.dp > 1:
        lay = ev.layout
        nbytes = max(s.params for s in ev.stages) * ctx.grad_bytes
        notes.append("allreduce: " + allreduce_reason(ctx, nbytes, lay.dp, lay.tp, ev.allreduce, hookable(lay)))
    if par.sync == AUTO:
        notes.append("sync: synchronous (async and local SGD change the training result; set parallel.sync to use them)")
    if par.compression == AUTO:
        notes.append("compression: none (lossy; set parallel.compression to trade accuracy for bandwidth)")
    servers = par.dedicated_ps_servers()
    if servers:
        notes.append(f"parameter servers: {servers} of the {spec.cluster.world_size} devices are dedicated servers "
                     f"(ranks {spec.cluster.world_size - servers}-{spec.cluster.world_size - 1}); the mesh covers the "
                     f"other {spec.cluster.world_size - servers}. TFLOPs per device, MFU, energy and cost count all "
                     "devices; memory is estimated for the workers only")
    return notes


def batch_statistics_notes(model: ModelCosts, micro_batch: int, global_batch: int) -> list[str]:
    """A warning when the plan splits the batch of a model whose layers normalise over the batch.

    BatchNorm in training mode computes its statistics over the rows it is given (Ioffe & Szegedy
    2015, Alg. 1), so once a replica's micro-batch is smaller than the global batch the parallel
    run's numbers differ from one process's (as with DDP); the search does not avoid such layouts.
    """
    if not model.batch_statistics or micro_batch >= global_batch:
        return []
    shown = ", ".join(model.batch_statistics[:3]) + (", ..." if len(model.batch_statistics) > 3 else "")
    return [f"batch statistics: {len(model.batch_statistics)} BatchNorm layer(s) ({shown}) normalise over each "
            f"micro-batch of {micro_batch} sample(s), not the global batch of {global_batch}: the run is valid but "
            "does not reproduce one process's losses; use GroupNorm/LayerNorm (or SyncBatchNorm with "
            "micro_batch = global_batch / dp on GPUs) where that matters"]


def _resolved_comm(spec: Spec, ev: Evaluation) -> CommSpec:
    """The spec's comm options, with hierarchical all-reduce's ranks per node filled in: the members
    of a (consecutive, tp = 1) dp group that share a node, ``gcd(dp, devices_per_node)``."""
    comm = spec.parallel.comm
    if ev.allreduce == "hierarchical" and comm.local_size is None:
        return comm.model_copy(update={"local_size": math.gcd(ev.layout.dp, spec.cluster.devices_per_node)})
    return comm


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
        comm=_resolved_comm(spec, ev),
        tp_styles=tp_styles(spec, model, lay.tp),
        stages=_stage_plans(ev, model, mesh),
        model=ModelSummary(params=int(model.params), flops_per_sample=model.flops_per_sample, layers=model.blocks),
        estimate=_estimate(ev, model, spec, ctx),
        alternatives=_alternatives(result, float(spec.cluster.device.memory), keep),
        search=SearchStats(candidates=result.candidates, evaluated=result.evaluated, feasible=result.feasible),
        notes=_notes(spec, ev, ctx) + batch_statistics_notes(model, ev.layout.micro_batch, spec.training.global_batch),
    )
