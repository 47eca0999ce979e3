"""Feasibility of one candidate against the user's constraints and the fp32 baseline.

Units: sizes in MB = 1e6 bytes (of the ONNX file on disk), latencies in ms (ONNX Runtime p50 at
the target batch size and thread count), quality as a fraction in [0, 1] (0.01 = one point).

Besides the user's limits one rule always holds: never ship an artifact that is larger or slower
than the fp32 baseline on the target runtime. Latency is noisy on shared cores, so "slower" is
judged on the p50 measured side by side with the baseline (interleaved, spinning off), with a
small tolerance: a candidate within ``SLOWER_TOLERANCE`` of the baseline counts as not faster,
which is rejected too (shipping a compressed model that is not faster is pointless, and a
borderline ratio would flip between runs).
"""

from __future__ import annotations

from app.engine.types import Constraints, Metrics

MB = 1e6  # bytes

# A candidate must be at least this much faster than the baseline (p50 ratio <= 1 - tol) to
# pass the never-slower rule. 3 % is above the 0.96-1.05x spread of an identical model
# measured side by side with spinning off (DESIGN §6) only at its median; see module doc.
SLOWER_TOLERANCE = 0.03


def check(metrics: Metrics, baseline: Metrics, constraints: Constraints) -> list[str]:
    """Reasons why ``metrics`` fails; an empty list means the candidate is feasible."""
    reasons: list[str] = []
    size_mb = metrics.size_bytes / MB
    if constraints.max_size_mb is not None and size_mb > constraints.max_size_mb:
        reasons.append(f"size {size_mb:.3f} MB > max {constraints.max_size_mb:g} MB")
    max_ms = constraints.max_latency_ms
    if max_ms is not None and metrics.latency_p50_ms > max_ms:
        reasons.append(
            f"latency p50 {metrics.latency_p50_ms:.3f} ms > max {constraints.max_latency_ms:g} ms"
            f" (batch {constraints.batch_size}, {constraints.threads} threads)"
        )
    drop = baseline.quality - metrics.quality
    if constraints.max_accuracy_drop is not None and drop > constraints.max_accuracy_drop + 1e-9:
        reasons.append(
            f"{metrics.quality_kind} drop {drop * 100:.2f} points > max"
            f" {constraints.max_accuracy_drop * 100:.2f} points"
            f" ({metrics.quality:.4f} vs baseline {baseline.quality:.4f})"
        )
    reasons.extend(never_worse_reasons(metrics, baseline))
    return reasons


def never_worse_reasons(metrics: Metrics, baseline: Metrics) -> list[str]:
    """The always-on rule: not larger and not slower than the fp32 baseline."""
    reasons: list[str] = []
    if metrics.size_bytes >= baseline.size_bytes:
        reasons.append(
            f"not smaller than the fp32 baseline"
            f" ({metrics.size_bytes} >= {baseline.size_bytes} bytes)"
        )
    if baseline.latency_p50_ms > 0 and (
        metrics.latency_p50_ms > baseline.latency_p50_ms * (1.0 - SLOWER_TOLERANCE)
    ):
        ratio = metrics.latency_p50_ms / baseline.latency_p50_ms
        reasons.append(
            f"not faster than the fp32 baseline on the target runtime"
            f" ({metrics.latency_p50_ms:.3f} ms vs {baseline.latency_p50_ms:.3f} ms, {ratio:.2f}x)"
        )
    return reasons


def cost_reasons(metrics: Metrics, baseline: Metrics, constraints: Constraints) -> list[str]:
    """Reasons from size and latency only (known before any training): the cheap filter."""
    relaxed = Constraints(
        max_size_mb=constraints.max_size_mb,
        max_latency_ms=constraints.max_latency_ms,
        max_accuracy_drop=None,
        batch_size=constraints.batch_size,
        threads=constraints.threads,
        objective=constraints.objective,
        time_budget_s=constraints.time_budget_s,
    )
    return check(metrics, baseline, relaxed)


def violation(metrics: Metrics, baseline: Metrics, constraints: Constraints) -> tuple[float, int]:
    """How far from feasible: (summed relative excess, number of violated rules).

    Used to pick the "closest" candidate when nothing is feasible: the smallest total excess,
    each axis relative to its own limit so MB, ms and points are comparable (a candidate 2 %
    over a latency limit and 6 points under the accuracy limit is closer than one that meets
    latency but lost 80 points), then the fewest violated rules.
    """
    count = 0
    excess = 0.0
    if constraints.max_size_mb is not None:
        over = metrics.size_bytes / MB / constraints.max_size_mb - 1.0
        if over > 0:
            count, excess = count + 1, excess + over
    if constraints.max_latency_ms is not None:
        over = metrics.latency_p50_ms / constraints.max_latency_ms - 1.0
        if over > 0:
            count, excess = count + 1, excess + over
    if constraints.max_accuracy_drop is not None:
        over_pts = (baseline.quality - metrics.quality) - constraints.max_accuracy_drop
        if over_pts > 1e-9:
            # One point over a 1-point limit counts like 100 % over a size limit.
            count, excess = count + 1, excess + over_pts / max(constraints.max_accuracy_drop, 0.01)
    if metrics.size_bytes >= baseline.size_bytes:
        count, excess = count + 1, excess + metrics.size_bytes / baseline.size_bytes - 1.0 + 1.0
    if baseline.latency_p50_ms > 0:
        over = metrics.latency_p50_ms / baseline.latency_p50_ms - (1.0 - SLOWER_TOLERANCE)
        if over > 0:
            count, excess = count + 1, excess + over + 1.0
    return excess, count
