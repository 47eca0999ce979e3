"""Overall progress and ETA of one run, weighted by the work the planner expects.

Stage fractions say little about a job: the search spends seconds on each cheap candidate and
minutes distilling a few (a 317 s job spent 284 s of it in distillation, while a per-stage
formula had reached 0.99 at 36 s). So the overall fraction is time-based::

    overall = elapsed / (elapsed + expected remaining seconds)

The remaining seconds come from the planner's plan (cheap builds left, the cheap measurement,
distillations left with their epochs, the export), priced at what this run measured so far:
seconds per cheap build and per distillation epoch (before the first one, the load + baseline
time stands in for a build, and a build for an epoch). Each distillation is bounded by its time
budget, and everything by the run's hard deadline. ``overall`` never goes backwards and stays
below 1 until :meth:`Tracker.done`.

    >>> t = Tracker(deadline=100.0, now=lambda: 10.0)
    >>> t.plan(builds=4, distills=1, epochs=10)
    >>> t.status("prune").eta_s is not None
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from app.engine.types import Activity, ProgressStatus

# Until measured, in cheap builds (prune + calibrate + convert + ONNX export): the seconds after
# a distillation's last epoch (QAT convert, ONNX export, measurement), the final export (.pt2,
# ONNX parity) and the cheap measurement per candidate. Measured on an MLP job here: 0.3, 0.1
# and 0.1 builds; rounded up, since loaded machines slow exports more than training.
AFTER_DISTILL_BUILDS = 0.5
EXPORT_BUILDS = 0.25
MEASURE_BUILDS = 0.25
MAX_BEFORE_DONE = 0.99


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class _Item:
    kind: str  # build | measure | distill | export
    started: float  # monotonic seconds
    index: int | None = None
    total: int | None = None
    label: str | None = None
    budget_s: float | None = None


class Tracker:
    """Fed by the planner (``plan``, ``begin``) and the distillation loop (``epoch_done``)."""

    def __init__(self, deadline: float, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self.start = now()
        self.deadline = deadline  # monotonic seconds
        self.builds = 0  # cheap builds planned
        self.distills = 0  # distillations expected
        self.epochs = 0  # epochs per distillation
        self._planned_at: float | None = None
        self._item: _Item | None = None
        self._done: dict[str, int] = {}
        self._seconds: dict[str, list[float]] = {}
        self._epoch_s: list[float] = []
        self._epoch = 0  # epochs finished in the current distillation
        self._epoch_started = self.start
        self._overall = 0.0
        self._finished = False

    # -- what the planner says ----------------------------------------------------------------

    def plan(self, *, builds: int | None = None, distills: int | None = None,
             epochs: int | None = None) -> None:
        """The expected work; later calls refine it (``None`` keeps a figure)."""
        if self._planned_at is None:
            self._planned_at = self._now()
        if builds is not None:
            self.builds = builds
        if distills is not None:
            self.distills = distills
        if epochs is not None:
            self.epochs = epochs

    def begin(self, kind: str, *, index: int | None = None, total: int | None = None,
              label: str | None = None, budget_s: float | None = None) -> None:
        """A new item of work starts (the previous one ends): its kind, e.g. candidate 2/7."""
        now = self._now()
        self._close(now)
        self._item = _Item(kind, now, index, total, label, budget_s)
        if kind == "distill":
            self._epoch, self._epoch_started = 0, now

    def epoch_done(self) -> None:
        now = self._now()
        self._epoch_s.append(now - self._epoch_started)
        self._epoch, self._epoch_started = self._epoch + 1, now

    def done(self) -> None:
        self._close(self._now())
        self._finished = True

    def _close(self, now: float) -> None:
        if self._item is not None:
            kind = self._item.kind
            if kind == "distill" and self._epoch:
                self._seconds.setdefault("after_distill", []).append(now - self._epoch_started)
            self._seconds.setdefault(kind, []).append(now - self._item.started)
            self._done[kind] = self._done.get(kind, 0) + 1
            self._item = None

    # -- estimates ----------------------------------------------------------------------------

    def _build_s(self) -> float:
        measured = _mean(self._seconds.get("build", []))
        if measured is not None:
            return measured
        setup = (self._planned_at or self._now()) - self.start
        return max(setup, 0.1)

    def _distill_s(self, epochs_left: int, budget_s: float | None) -> float:
        epoch_s = _mean(self._epoch_s) or self._build_s()
        train = epochs_left * epoch_s
        if budget_s is not None:
            train = min(train, budget_s)
        return train

    def remaining_s(self) -> float | None:
        """Expected seconds to the end, or None before the plan is known."""
        if self._finished:
            return 0.0
        if self._planned_at is None:
            return None
        now = self._now()
        build = self._build_s()
        cur = self._item
        in_cur = now - cur.started if cur is not None else 0.0
        kind = cur.kind if cur is not None else None
        left = 0.0
        # Cheap builds: those not started, and what the current one should still take.
        builds_done = self._done.get("build", 0) + (kind == "build")
        left += max(self.builds - builds_done, 0) * build
        if kind == "build":
            left += max(build - in_cur, 0.0)
        # The cheap measurement (once).
        if not self._done.get("measure") and not self._done.get("distill"):
            # The load + baseline time holds one measurement too: where builds are quick
            # (ONNX Runtime quantization, under a second) it prices measuring better.
            setup = (self._planned_at or now) - self.start
            measure = MEASURE_BUILDS * max(build, setup) * max(self.builds, 1)
            left += max(measure - in_cur, 0.0) if kind == "measure" else measure
        # Distillations: the current one (epochs left, within its budget), then the rest.
        after = _mean(self._seconds.get("after_distill", [])) or AFTER_DISTILL_BUILDS * build
        started = self._done.get("distill", 0) + (kind == "distill")
        if kind == "distill" and cur is not None:
            budget_left = None if cur.budget_s is None else max(cur.budget_s - in_cur, 0.0)
            left += self._distill_s(max(self.epochs - self._epoch, 0), budget_left) + after
        left += max(self.distills - started, 0) * (self._distill_s(self.epochs, None) + after)
        # The export.
        export = EXPORT_BUILDS * build
        left += max(export - in_cur, 0.0) if kind == "export" else export
        return max(min(left, self.deadline - now), 0.0)

    def status(self, stage: str) -> ProgressStatus:
        """Overall fraction (monotonic), ETA in seconds and what runs now."""
        remaining = self.remaining_s()
        if self._finished:
            self._overall = 1.0
        elif remaining is not None:
            elapsed = self._now() - self.start
            overall = elapsed / (elapsed + remaining) if elapsed + remaining > 0 else 0.0
            self._overall = max(self._overall, min(overall, MAX_BEFORE_DONE))
        cur = self._item
        distilling = cur is not None and cur.kind == "distill"
        activity = Activity(
            stage=stage,
            candidate=None if cur is None else cur.label,
            candidate_index=None if cur is None else cur.index,
            candidates_total=None if cur is None else cur.total,
            epoch=min(self._epoch, self.epochs) if distilling else None,
            epochs_total=self.epochs if distilling else None,
        )
        eta = None if remaining is None else round(remaining, 1)
        return ProgressStatus(overall=round(self._overall, 4), eta_s=eta, activity=activity)
