"""Fits of ``trainplan calibrate``'s raw timings: the alpha-beta link of point-to-point and all-reduce
times, bus and copy bandwidth; and the error a failed calibration raises."""

from __future__ import annotations

from collections.abc import Sequence

from trainplan.errors import TrainplanError


class CalibrationError(TrainplanError):
    """Calibration could not measure this machine; the message names the step, the cause and the fix."""


def fit_alpha_beta(nbytes: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of the Hockney model ``t = alpha + bytes / beta``.

    Returns ``(alpha seconds, beta bytes/s)``. Residuals are weighted by ``1 / t**2`` (relative
    error), so the 4 KiB points that carry the latency count as much as the 64 MiB ones that carry
    the bandwidth; an unweighted fit lets the big messages swamp alpha. Raises ``ValueError`` when
    fewer than two distinct sizes are given or the time does not grow with the size.
    """
    if len(nbytes) != len(seconds) or len(set(nbytes)) < 2:
        raise ValueError("fit_alpha_beta needs at least two distinct message sizes, one time each")
    if min(seconds) <= 0:
        raise ValueError(f"message times must be positive, got {min(seconds)}")
    w = [1.0 / t**2 for t in seconds]
    wsum = sum(w)
    xbar = sum(wi * x for wi, x in zip(w, nbytes)) / wsum
    ybar = sum(wi * t for wi, t in zip(w, seconds)) / wsum
    sxy = sum(wi * (x - xbar) * (t - ybar) for wi, x, t in zip(w, nbytes, seconds))
    sxx = sum(wi * (x - xbar) ** 2 for wi, x in zip(w, nbytes))
    slope = sxy / sxx  # seconds per byte
    if slope <= 0:
        raise ValueError("message time does not grow with message size; the measurements are too noisy to fit")
    return ybar - slope * xbar, 1.0 / slope


def bus_bandwidth(nbytes: float, seconds: float, world_size: int) -> float:
    """All-reduce bus bandwidth in bytes/s, as nccl-tests defines it (doc/PERFORMANCE.md):
    ``busbw = algbw * 2(n-1)/n`` with ``algbw = bytes / time``; comparable to a link's bandwidth."""
    if world_size < 2:
        raise ValueError(f"bus bandwidth needs at least 2 ranks, got {world_size}")
    return nbytes / seconds * 2 * (world_size - 1) / world_size


def copy_bandwidth(nbytes: float, seconds: float) -> float:
    """Memory bandwidth of copying ``nbytes`` in ``seconds``: the bytes read plus the bytes written
    over the time, as STREAM counts its Copy kernel (McCalpin 1995, "Memory Bandwidth and Machine
    Balance", counting 2 words of traffic per element copied). Bytes/s."""
    if nbytes <= 0 or seconds <= 0:
        raise ValueError(f"a copy needs positive bytes and time, got {nbytes} B in {seconds} s")
    return 2 * nbytes / seconds


def round_significant(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant figures, as the cluster file records measurements."""
    return float(f"{x:.{digits}g}")


def link_from_p2p(p2p: Sequence[tuple[int, float]]) -> dict[str, float]:
    """The alpha-beta link of the ping-pong timings. A non-positive fitted alpha means the latency is
    below what the timings resolve; the fastest message's time is then used, an upper bound on it."""
    sizes, times = [n for n, _ in p2p], [s for _, s in p2p]
    try:
        alpha, beta = fit_alpha_beta(sizes, times)
    except ValueError as exc:
        raise CalibrationError(f"cannot fit the p2p link: {exc}; run again on a less loaded machine") from None
    return {"bandwidth": round_significant(beta), "latency": round_significant(alpha if alpha > 0 else min(times))}


def link_from_allreduce(allreduce: Sequence[tuple[int, float]], n: int) -> dict[str, float]:
    """The alpha-beta link that makes the cost model's ring all-reduce reproduce the measured one.

    The planner charges an all-reduce of ``S`` bytes among ``n`` ranks ``2(n−1)·α + 2(n−1)/n · S/β``
    (Patarasuk & Yuan 2009; :func:`trainplan.planner.cost.comm.ring_allreduce_time_s`). A
    least-squares line ``t = a + S/b`` through the measured all-reduce times therefore gives
    ``α = a / (2(n−1))`` and ``β = b · 2(n−1)/n``. Unlike a ping-pong between two ranks while the
    others wait, this is measured with every process in the collective, as in training: where the
    processes outnumber the cores (4 processes on 2 cores here) a collective's latency is the
    scheduler's, many times the idle ping-pong's, and ZeRO-3 or tensor parallelism pay it per layer.
    """
    if n < 2:
        raise ValueError(f"an all-reduce link needs at least 2 ranks, got {n}")
    sizes, times = [b for b, _ in allreduce], [t for _, t in allreduce]
    try:
        intercept, bandwidth = fit_alpha_beta(sizes, times)
    except ValueError as exc:
        raise CalibrationError(f"cannot fit the all-reduce timings: {exc}; run again on a less loaded machine") from None
    hops = 2 * (n - 1)
    latency = intercept / hops if intercept > 0 else min(times) / hops
    return {"bandwidth": round_significant(bandwidth * hops / n), "latency": round_significant(latency)}


def native_collective_latency(timings: Sequence[tuple[int, float]], n: int) -> float:
    """Per ring step latency ``α`` of torch.distributed's all-gather or reduce-scatter from its timings
    (``(bytes of the full buffer, seconds)``, every process taking part): the planner charges either
    ``(n−1)·α + (n−1)/n · S/β`` (Patarasuk & Yuan 2009; :func:`trainplan.planner.cost.comm.
    all_gather_time_s`), so the intercept of a least-squares line through the timings is ``(n−1)·α``.
    Where the times do not grow with the size over the measured range (the latency dominates), the
    fastest time stands for the intercept, an upper bound on it."""
    if n < 2:
        raise ValueError(f"a collective's latency needs at least 2 ranks, got {n}")
    sizes, times = [b for b, _ in timings], [t for _, t in timings]
    try:
        intercept, _ = fit_alpha_beta(sizes, times)
    except ValueError:
        intercept = 0.0
    return round_significant((intercept if intercept > 0 else min(times)) / (n - 1))


def latency_of(seconds: float, nbytes: float, n: int, bandwidth: float) -> float:
    """The per ring step latency that makes the planner's ring all-gather / reduce-scatter of an
    ``nbytes`` buffer among ``n`` ranks, ``(n−1)/n · S/B + (n−1)·α`` (Patarasuk & Yuan 2009;
    :func:`trainplan.planner.cost.comm.all_gather_time_s`), take ``seconds``: at least 0."""
    if n < 2:
        raise ValueError(f"a collective's latency needs at least 2 ranks, got {n}")
    volume = (n - 1) / n * nbytes / bandwidth
    return round_significant(max(0.0, seconds - volume) / (n - 1))
