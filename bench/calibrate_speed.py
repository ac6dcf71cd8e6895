"""How long `trainplan calibrate` takes and what it measures on this machine.

Runs the calibration (quick, then full unless ``--quick-only``) without writing a file and prints
a table and one JSON line per mode: wall time, peak FLOP/s per dtype, efficiency, the fitted p2p
link, and the largest all-reduce next to what the fitted link predicts for it with the ring
formula ``2(n-1)/n * bytes / bandwidth + 2(n-1) * latency`` (Thakur et al., IJHPCA 2005), so a
gap between the link model and the real collective is visible.

    .venv/bin/python bench/calibrate_speed.py [--nproc 2] [--quick-only]
"""

from __future__ import annotations

import argparse
import json
import time

from trainplan.runtime.calibrate import bus_bandwidth, cluster_from_measurement, measure


def run(nproc: int, quick: bool) -> dict[str, object]:
    start = time.monotonic()
    m = measure(nproc=nproc, quick=quick)
    cluster = cluster_from_measurement(m, base="cpu-local" if m.backend == "gloo" else None)
    row: dict[str, object] = {
        "mode": "quick" if quick else "full",
        "nproc": nproc,
        "threads": m.threads,
        "wall_s": round(time.monotonic() - start, 2),
        "peak_gflops": {d: round(f / 1e9, 1) for d, f in cluster.device.peak_flops.items()},
        "efficiency": cluster.device.efficiency,
        "link_gb_s": round(cluster.intra_node.bandwidth / 1e9, 3),
        "link_latency_us": round(cluster.intra_node.latency * 1e6, 1),
    }
    if m.allreduce:
        n, s = m.allreduce[-1]
        link = cluster.intra_node
        ring = 2 * (nproc - 1) / nproc * n / link.bandwidth + 2 * (nproc - 1) * link.latency
        row.update(allreduce_bytes=n, allreduce_ms=round(s * 1e3, 2), ring_model_ms=round(ring * 1e3, 2),
                   busbw_gb_s=round(bus_bandwidth(n, s, nproc) / 1e9, 3))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--quick-only", action="store_true")
    args = parser.parse_args()
    rows = [run(args.nproc, quick=True)] + ([] if args.quick_only else [run(args.nproc, quick=False)])
    print(f"{'mode':6} {'wall s':>7} {'fp32 GF/s':>10} {'eff':>6} {'link GB/s':>10} {'lat us':>8} "
          f"{'allreduce ms':>13} {'ring model ms':>14}")
    for r in rows:
        peak = r["peak_gflops"]
        print(f"{r['mode']:6} {r['wall_s']:7.1f} {peak.get('fp32', 0):10.1f} {r['efficiency']:6.3f} "  # type: ignore[union-attr]
              f"{r['link_gb_s']:10.3f} {r['link_latency_us']:8.1f} {r.get('allreduce_ms', 0):13.2f} "
              f"{r.get('ring_model_ms', 0):14.2f}")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
