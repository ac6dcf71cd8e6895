"""``trainplan calibrate --refresh CLUSTER``: bring a CPU calibration to the machine's current speed.

Why: on a shared machine the speed a training run gets drifts over minutes. On this project's
2-core VM, six full calibrations in a row, each followed by the accuracy matrix, counted 8 to 27 of
36 step times within 20% (docs/accuracy.md); the measured per-worker speed under lockstep
(``compute_share``) moved between 0.30 and 0.40 between calibrations, and every compute term of the
cost model is divided by it. A full calibration takes about 2.5 minutes; this re-runs only the
lockstep probe (:func:`trainplan.runtime.calibrate_framework.lockstep_pace`, about 15 s with the
workers' start) and:

* replaces ``compute_share`` with the share measured now;
* scales every cost measured as compute at one worker's full speed — ``op_costs``, ``tp_overhead``,
  ``fsdp_unit_overhead`` — by the *pace*, the probe's step alone now over the same step when the
  cluster was calibrated (``device.pace_reference_s``), and records the new reference.

Links (bandwidths, latencies) are left as calibrated. Pure functions except :func:`refresh`.

What it corrects, measured (docs/accuracy.md, sixth session): a change of load between
calibrating and running. A calibration taken beside a CPU hog put gpt / llama dp4 and ZeRO-1 at
−17% to −21%, and refreshed at −4% to +14%. It does not remove the VM's moment-to-moment noise:
refreshes a minute apart measured pace 0.87-1.32 and share 0.31-0.43.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from trainplan.ir.cluster import Cluster
from trainplan.runtime.calibrate import (
    CalibrationError,
    resolve_backend,
    run_local_workers,
    threads_per_process,
    usable_cores,
)
from trainplan.runtime.calibrate_links import round_significant
from trainplan.runtime.calibrate_ops import collective_wait, measured_share

PACE_TARGET = "trainplan.runtime.calibrate_bench:pace_worker"
OP_COST_TIMES = ("fwd_fixed_s", "fwd_per_unit_s", "bwd_fixed_s", "bwd_per_unit_s")


def check_refreshable(cluster: Cluster) -> None:
    """Raise :class:`CalibrationError` with the fix unless ``cluster`` has a pace reference and measured
    operator costs (a CPU cluster written by `trainplan calibrate`)."""
    if cluster.device.pace_reference_s is None or not cluster.device.op_costs:
        raise CalibrationError("this cluster has no pace reference (device.pace_reference_s) or no measured "
                               "operator costs: refresh works on a CPU cluster written by `trainplan calibrate`; "
                               "run a full `trainplan calibrate` first")


def refreshed(cluster: Cluster, share: float, solo_s: float, wait_s: float | None = None) -> tuple[Cluster, float]:
    """``cluster`` at the pace of a lockstep probe that measured ``share`` and ``solo_s`` seconds alone,
    and that pace (``solo_s / device.pace_reference_s``: above 1, the machine is slower now).
    ``wait_s``: the probe's ``collective_wait_s`` now, which replaces the calibrated one (None keeps it)."""
    check_refreshable(cluster)
    device = cluster.device
    if solo_s <= 0 or not 0 < share <= 1:
        raise CalibrationError(f"the lockstep probe measured share {share} and {solo_s} s alone; run it again")
    pace = solo_s / device.pace_reference_s
    data = cluster.model_dump(mode="json", by_alias=True, exclude_none=True)
    d = data["device"]
    for table in d["op_costs"].values():
        for cost in table.values():
            for key in OP_COST_TIMES:
                cost[key] = round_significant(cost[key] * pace)
    tp = d.get("tp_overhead", {})
    for key, value in list(tp.items()):
        tp[key] = ({k: round_significant(v * pace) for k, v in value.items()} if isinstance(value, dict)
                   else round_significant(value * pace))
    d["fsdp_unit_overhead"] = round_significant(d.get("fsdp_unit_overhead", 0.0) * pace)
    d["compute_share"] = round_significant(share, 3)
    if wait_s is not None:
        d["collective_wait_s"] = round_significant(max(0.0, wait_s))
    d["pace_reference_s"] = round_significant(solo_s)
    return Cluster.model_validate(data), pace


def refresh(cluster: Cluster, *, timeout_s: float = 120.0, quick: bool = False) -> tuple[Cluster, float]:
    """Run the lockstep probe on this machine with the cluster's processes (``devices_per_node``, the
    process count it was calibrated with; ``quick``: the fewer rounds of ``calibrate --quick``) and
    return :func:`refreshed` of it."""
    check_refreshable(cluster)  # before the probe: a preset's cluster fails at once
    backend = resolve_backend("gloo")
    nproc = cluster.devices_per_node
    if nproc < 2:
        raise CalibrationError("refresh needs the lockstep probe of 2 or more processes; this cluster has "
                               f"devices_per_node {nproc}")
    threads = threads_per_process(usable_cores(), nproc)
    results = run_local_workers(PACE_TARGET, nproc, backend=backend, config={"quick": quick}, threads=threads,
                                timeout_s=timeout_s)
    lockstep = results[0].get("lockstep")
    if not lockstep:
        raise CalibrationError("the lockstep probe returned nothing on rank 0")
    share = measured_share(float(lockstep[0]), usable_cores(), nproc, threads, backend)
    return refreshed(cluster, share, float(lockstep[1]), collective_wait(lockstep, backend))


def render_refreshed(cluster: Cluster, before: Cluster, pace: float, source: Path) -> str:
    """The refreshed cluster as YAML, with a header saying what changed."""
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    header = [
        f"Refreshed by `trainplan calibrate --refresh {source}` at {when}: the lockstep probe's step alone took "
        f"{cluster.device.pace_reference_s:.4g} s against {before.device.pace_reference_s:.4g} s before (pace x{pace:.3f}); "
        f"op_costs, tp_overhead and fsdp_unit_overhead scaled by it; compute_share {before.device.compute_share:.3g} -> "
        f"{cluster.device.compute_share:.3g} and collective_wait_s {before.device.collective_wait_s:.3g} -> "
        f"{cluster.device.collective_wait_s:.3g} (measured now). Links are as calibrated.",
    ]
    data: dict[str, Any] = cluster.model_dump(mode="json", by_alias=True, exclude_none=True)
    text = "\n".join(f"# {line}" for line in header) + "\n" + yaml.safe_dump(data, sort_keys=False,
                                                                              default_flow_style=False)
    if Cluster.model_validate(yaml.safe_load(text)) != cluster:
        raise CalibrationError("internal error: the refreshed cluster YAML does not read back the same")
    return text
