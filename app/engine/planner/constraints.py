"""Feasibility of one candidate against the user's constraints and the fp32 baseline.

Units: sizes in MB = 1e6 bytes (of the ONNX file on disk), latencies in ms (ONNX Runtime p50 at
the target batch size and thread count), quality as a fraction in [0, 1] (0.01 = one point).

Besides the user's limits one rule always holds: never ship an artifact that is larger or slower
than the fp32 baseline on the target runtime. Latency on shared cores is noisy (an identical
model measured 0.99x-1.29x of itself by p50 of single runs on a loaded machine), so "faster" is
judged on the ratio measured side by side with the baseline (``Metrics.latency``, from
``stages.evaluate.compare_latency``): the upper end of the ratio's confidence interval must lie
below 1 by more than the noise an identical-model control showed in the same run, and by at
least ``SLOWER_TOLERANCE`` (shipping a compressed model that is not faster is pointless, and a
borderline ratio would flip between runs). Metrics without that ratio (hand-made, or measured
alone) fall back to the p50 figures with ``SLOWER_TOLERANCE``.
"""

from __future__ import annotations

from app.engine.types import Constraints, Metrics

MB = 1e6  # bytes

# The smallest speed-up worth shipping (ratio <= 1 - tol), whatever the measured noise: a
# quiet machine can measure a control within +-1 %, and 1 % faster is no reason to ship.
SLOWER_TOLERANCE = 0.03


def speedup_margin(metrics: Metrics) -> float:
    """How far below 1 the candidate's latency ratio must be: the measured noise, >= the floor."""
    noise = metrics.latency.noise if metrics.latency is not None else 0.0
    return max(SLOWER_TOLERANCE, noise)


def _slowness(metrics: Metrics, baseline: Metrics) -> float:
    """> 0 when the candidate is not faster beyond noise: by how much its ratio misses."""
    if metrics.latency is not None:
        ratio = metrics.latency.ratio_high  # the pessimistic end of the interval
    elif baseline.latency_p50_ms > 0:
        ratio = metrics.latency_p50_ms / baseline.latency_p50_ms
    else:
        return 0.0
    return ratio - (1.0 - speedup_margin(metrics))


def check(metrics: Metrics, baseline: Metrics, constraints: Constraints, *,
          latency: bool = True) -> list[str]:
    """Reasons why ``metrics`` fails; an empty list means the candidate is feasible.

    ``latency=False`` leaves out the latency limit and the never-slower rule (the planner's
    question "could a new latency measurement make this one the choice?").
    """
    reasons: list[str] = []
    size_mb = metrics.size_bytes / MB
    if constraints.max_size_mb is not None and size_mb > constraints.max_size_mb:
        reasons.append(f"size {size_mb:.3f} MB > max {constraints.max_size_mb:g} MB")
    max_ms = constraints.max_latency_ms
    if latency and max_ms is not None and metrics.latency_p50_ms > max_ms:
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
    reasons.extend(never_worse_reasons(metrics, baseline, latency=latency))
    return reasons


def never_worse_reasons(metrics: Metrics, baseline: Metrics, *,
                        latency: bool = True) -> list[str]:
    """The always-on rule: not larger and not slower (``latency``) than the fp32 baseline."""
    reasons: list[str] = []
    if metrics.size_bytes >= baseline.size_bytes:
        reasons.append(
            f"not smaller than the fp32 baseline"
            f" ({metrics.size_bytes} >= {baseline.size_bytes} bytes)"
        )
    if latency and _slowness(metrics, baseline) > 0:
        lat = metrics.latency
        if lat is not None:
            measured = (f"ratio {lat.ratio:.3f}x, {lat.confidence:.0%} interval"
                        f" {lat.ratio_low:.3f}-{lat.ratio_high:.3f}, {lat.rounds} interleaved"
                        f" rounds; an identical model measured {lat.control_ratio:.3f}x, noise"
                        f" +-{lat.noise:.1%}")
        else:
            measured = f"{metrics.latency_p50_ms / baseline.latency_p50_ms:.2f}x"
        reasons.append(
            f"not faster than the fp32 baseline beyond the measured noise (needs ratio <"
            f" {1.0 - speedup_margin(metrics):.3f}): {metrics.latency_p50_ms:.3f} ms vs"
            f" {baseline.latency_p50_ms:.3f} ms, {measured}"
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
    over = _slowness(metrics, baseline)
    if over > 0:
        count, excess = count + 1, excess + over + 1.0
    return excess, count
