"""The planner: sweep cheap candidates, distill the promising ones, choose the best feasible.

Structure decides cost, distillation decides accuracy (DESIGN §3). Size and latency of a
candidate are known after prune + quantize + export, before any training, so:

1. *Cheap phase*: every (prune ratio x quant scheme) of the grid is pruned (no training),
   quantized with calibration and exported to ONNX; all of them are measured in ONE interleaved
   latency run together with the baseline (so every ratio is side by side), and their quality
   is evaluated on held-out data as they are (no recovery).
2. Candidates that fail a size / latency limit or the never-larger / never-slower rule are out
   for good: training does not change structure.
3. *Expensive phase*: the cost-feasible candidates are sorted in objective order (best first).
   Those after the first one that already meets the quality limit untrained cannot beat it.
   The rest are distilled (quantization-aware, KD from the fp32 teacher) by bisection over
   that order: distill the middle one; if it becomes feasible only the better-ranked ones
   remain to try, else only the less pruned ones (quality after distillation falls with the
   prune ratio, not with the quant scheme). Each distilled candidate is recorded; the search
   stops when the window is empty, the time budget or ``max_distill`` runs out. The result is
   the best feasible candidate by the objective among everything evaluated, not the first
   that passed in grid order.
4. No feasible candidate: the result is ``constraints_unsatisfiable`` with the closest one
   (fewest violated rules, then least relative excess) as ``best``.

Determinism. Size, parameters and quality are deterministic for a fixed seed (pruning,
calibration and CPU training are). Latency is not, so it never decides between two candidates
on a small difference: ``smallest`` ranks by size, then by latency in 10 %-wide log buckets, then
grid order; ``fastest`` ranks by the 10 % latency bucket, then size, then grid order. Latency
limits are pass/fail on the median of interleaved rounds, so only a candidate within noise
(a few %) of a latency limit can change the outcome between runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from app.engine.planner.constraints import check, cost_reasons, violation
from app.engine.progress import Tracker
from app.engine.types import (
    Candidate,
    Constraints,
    Metrics,
    Objective,
    ProgressFn,
    QuantScheme,
    Recipe,
)

LATENCY_BUCKET = 0.10  # relative width of the latency buckets used for ranking


class Evaluator(Protocol):
    """What the planner needs from the stages; ``pipeline.StageEvaluator`` is the real one."""

    baseline: Metrics

    # A "built" candidate is whatever the evaluator returns (it has a ``.recipe``).
    def build(self, recipe: Recipe) -> Any:
        """Prune (no training) + quantize (calibration) + export ONNX."""
        ...

    def measure(self, built: Sequence[Any]) -> list[Metrics]:
        """Size, quality on held-out data, latency side by side with the baseline."""
        ...

    def distill(self, built: Any, epochs: int, time_budget_s: float) -> Any:
        """Quantization-aware KD of ``built``'s pruned model; returns the converted candidate."""
        ...


@dataclass(frozen=True)
class SearchSpace:
    """The candidate grid and the distillation effort."""

    prune_ratios: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7)
    quant_schemes: tuple[QuantScheme, ...] = ("int8_static", "none")
    importance: str = "l2"
    distill_epochs: int = 12
    # Pruned students start far from the teacher: AdamW at 1e-3 recovers too slowly in a few
    # epochs; 5e-3 does (the fp32 models of the zoo are trained at 3e-3 .. 1e-2).
    lr: float = 5e-3
    max_distill: int = 4  # candidates distilled at most
    min_distill_s: float = 5.0  # do not start a distillation with less time than this left
    mixup: float = 0.0  # distillation input mixing (Recipe.mixup) of every candidate

    def grid(self, seed: int) -> list[Recipe]:
        out: list[Recipe] = []
        for ratio in self.prune_ratios:
            for quant in self.quant_schemes:
                if ratio == 0 and quant == "none":
                    continue  # that is the baseline itself: never smaller, never faster
                out.append(
                    Recipe(prune_ratio=ratio, quant=quant, importance=self.importance,  # type: ignore[arg-type]
                           distill_epochs=0, lr=self.lr, seed=seed, mixup=self.mixup)
                )
        return out


def default_space(*, linear_heavy: bool) -> SearchSpace:
    """Grid by model kind: dynamic int8 is a candidate where Linear layers dominate the MACs."""
    if linear_heavy:
        return SearchSpace(quant_schemes=("int8_dynamic", "int8_static", "none"))
    return SearchSpace()


@dataclass
class Outcome:
    status: str  # "succeeded" | "constraints_unsatisfiable"
    best_index: int
    candidates: list[Candidate]
    built: list[Any]  # parallel to candidates
    front: list[int]
    skipped: list[dict[str, str]] = field(default_factory=list)  # grid points that failed to build

    @property
    def best(self) -> Candidate:
        return self.candidates[self.best_index]


def _bucket(latency_ms: float) -> int:
    return math.floor(math.log(max(latency_ms, 1e-6)) / math.log1p(LATENCY_BUCKET))


def rank_key(c: Candidate, order: int, objective: Objective) -> tuple[float, ...]:
    """Sort key: lower is better for ``objective`` (see module doc on determinism)."""
    m = c.metrics
    if objective == "fastest":
        return (_bucket(m.latency_p50_ms), m.size_bytes, -m.quality, order)
    return (m.size_bytes, _bucket(m.latency_p50_ms), -m.quality, order)


def pareto_front(candidates: Sequence[Candidate]) -> list[int]:
    """Indices not dominated on (size, latency p50, quality)."""
    front: list[int] = []
    for i, a in enumerate(candidates):
        ma = a.metrics
        dominated = False
        for j, b in enumerate(candidates):
            if i == j:
                continue
            mb = b.metrics
            no_worse = (mb.size_bytes <= ma.size_bytes and mb.latency_p50_ms <= ma.latency_p50_ms
                        and mb.quality >= ma.quality)
            better = (mb.size_bytes < ma.size_bytes or mb.latency_p50_ms < ma.latency_p50_ms
                      or mb.quality > ma.quality)
            if no_worse and better:
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def choose(
    candidates: Sequence[Candidate], baseline: Metrics, constraints: Constraints
) -> tuple[str, int]:
    """Best feasible candidate by the objective, else the closest one (status says which)."""
    feasible = [i for i, c in enumerate(candidates) if c.feasible]
    if feasible:
        best = min(feasible, key=lambda i: rank_key(candidates[i], i, constraints.objective))
        return "succeeded", best
    best = min(
        range(len(candidates)),
        key=lambda i: (violation(candidates[i].metrics, baseline, constraints),
                       rank_key(candidates[i], i, constraints.objective)),
    )
    return "constraints_unsatisfiable", best


def _candidate(recipe: Recipe, m: Metrics, baseline: Metrics, constraints: Constraints,
               distilled: bool) -> Candidate:
    reasons = check(m, baseline, constraints)
    return Candidate(recipe=recipe, metrics=m, feasible=not reasons, distilled=distilled,
                     reasons=reasons)


def search(
    ev: Evaluator,
    constraints: Constraints,
    space: SearchSpace,
    *,
    seed: int,
    deadline: float,
    on_progress: ProgressFn | None = None,
    clock: Callable[[], float] = time.monotonic,
    tracker: Tracker | None = None,
) -> Outcome:
    """Run the planner (module doc). ``deadline`` is a ``clock()`` value for the whole search.
    ``tracker`` is told the plan and each item of work (overall progress and ETA)."""

    def progress(stage: str, frac: float, msg: str) -> None:
        if on_progress is not None:
            on_progress(stage, frac, msg)

    track = tracker or Tracker(deadline, clock)
    baseline = ev.baseline
    grid = space.grid(seed)
    # Until measured: the bisection's distillations for a window as large as the grid.
    track.plan(builds=len(grid), epochs=space.distill_epochs,
               distills=min(space.max_distill, math.ceil(math.log2(len(grid) + 1))))
    built: list[Any] = []
    skipped: list[dict[str, str]] = []
    build_s: list[float] = []  # seconds per cheap build: estimates convert + export after KD
    for k, recipe in enumerate(grid):
        if built and clock() > deadline:
            skipped.extend({"recipe": str(r.to_dict()), "error": "not built: time budget"}
                           for r in grid[k:])
            break
        label = f"prune {recipe.prune_ratio:.0%} {recipe.quant}" + (
            f" fp32:{','.join(recipe.keep_fp32)}" if recipe.keep_fp32 else "")
        track.begin("build", index=k + 1, total=len(grid), label=label)
        progress("prune", k / len(grid), f"candidate {k + 1}/{len(grid)}: prune "
                 f"{recipe.prune_ratio:.0%}, quant {recipe.quant}")
        t0 = clock()
        try:
            built.append(ev.build(recipe))
            build_s.append(clock() - t0)
        except Exception as e:  # one grid point failing to build must not sink the search
            from app.engine.errors import Cancelled, TimeBudgetExceeded

            if isinstance(e, Cancelled | TimeBudgetExceeded):
                raise
            skipped.append({"recipe": str(recipe.to_dict()), "error": f"{type(e).__name__}: {e}"})
        progress("quantize", (k + 1) / len(grid), f"built {k + 1}/{len(grid)} candidates")
    if not built:
        from app.engine.errors import InvalidRecipe

        raise InvalidRecipe("no candidate of the search grid could be built: "
                            + "; ".join(s["error"] for s in skipped))
    track.begin("measure", total=len(built))
    progress("evaluate", 0.0, f"measuring {len(built)} candidates side by side with the baseline")
    metrics = ev.measure(built)
    candidates = [_candidate(b.recipe, m, baseline, constraints, False)
                  for b, m in zip(built, metrics, strict=True)]
    progress("evaluate", 1.0, f"{sum(c.feasible for c in candidates)} of {len(candidates)} "
             "candidates feasible without training")

    # Expensive phase: cost-feasible candidates in objective order.
    cost_ok = [i for i, c in enumerate(candidates)
               if not cost_reasons(c.metrics, baseline, constraints)]
    order = sorted(cost_ok, key=lambda i: rank_key(candidates[i], i, constraints.objective))
    # Candidates after the first one that is already feasible cannot beat it: drop them.
    first_ok = next((k for k, i in enumerate(order) if candidates[i].feasible), len(order))
    window = order[:first_ok]  # untried candidates that could still beat the current best
    distilled = 0
    track.plan(distills=min(space.max_distill, math.ceil(math.log2(len(window) + 1))))
    while window:
        # After training: convert + export + measure, about three cheap builds' worth (loaded
        # machines make the QAT convert and export slower than the cheap builds were).
        after_s = 3.0 * sorted(build_s)[len(build_s) // 2] if build_s else 0.0
        remaining = deadline - clock() - after_s
        if distilled >= space.max_distill or remaining < space.min_distill_s:
            break
        # Bisection over the objective order: try the middle one; if it passes, only better
        # ones are left to try, else only less pruned ones. About log2(n) distillations find
        # the boundary; each gets an equal share of the time for the steps still expected.
        mid = len(window) // 2
        steps = min(space.max_distill - distilled, math.ceil(math.log2(len(window) + 1)))
        budget = max(space.min_distill_s, remaining / max(steps, 1))
        i = window[mid]
        r = candidates[i].recipe
        track.plan(distills=distilled + steps)
        track.begin("distill", index=distilled + 1, total=distilled + steps, budget_s=budget,
                    label=f"prune {r.prune_ratio:.0%} {r.quant}")
        progress("distill", 0.0, f"distilling prune {candidates[i].recipe.prune_ratio:.0%} "
                 f"{candidates[i].recipe.quant} (budget {budget:.0f} s)")
        b2 = ev.distill(built[i], space.distill_epochs, budget)
        distilled += 1
        m2 = ev.measure([b2])[0]
        c2 = _candidate(b2.recipe, m2, baseline, constraints, True)
        candidates.append(c2)
        built.append(b2)
        if c2.feasible:
            window = window[:mid]  # only better-ranked candidates can still beat it
        else:
            # Quality after distillation falls with the prune ratio, whatever the quant
            # scheme: drop this one and every candidate pruned at least as hard.
            ratio = candidates[i].recipe.prune_ratio
            window = [j for j in window if candidates[j].recipe.prune_ratio < ratio]
    track.plan(distills=distilled)
    if distilled == 0:
        why = ("distillation is off for this model" if space.max_distill == 0
               else "a candidate meets every constraint untrained" if first_ok < len(order)
               else "no candidate meets the size / latency limits" if not order
               else "no time left in the budget")
        progress("distill", 1.0, f"no distillation: {why}")

    status, best = choose(candidates, baseline, constraints)
    return Outcome(status=status, best_index=best, candidates=candidates, built=built,
                   front=pareto_front(candidates), skipped=skipped)


def run_recipe(ev: Evaluator, recipe: Recipe, constraints: Constraints, *, deadline: float,
               on_progress: ProgressFn | None = None,
               clock: Callable[[], float] = time.monotonic,
               tracker: Tracker | None = None) -> Outcome:
    """An explicit recipe skips the search: build it, distill if asked, measure, check."""

    def progress(stage: str, frac: float, msg: str) -> None:
        if on_progress is not None:
            on_progress(stage, frac, msg)

    track = tracker or Tracker(deadline, clock)
    distills = int(recipe.distill_epochs > 0)
    label = f"prune {recipe.prune_ratio:.0%} {recipe.quant}"
    track.plan(builds=1, distills=distills, epochs=recipe.distill_epochs)
    track.begin("build", index=1, total=1, label=label)
    progress("prune", 0.0, f"recipe: prune {recipe.prune_ratio:.0%} ({recipe.importance})")
    b = ev.build(replace(recipe, distill_epochs=0))
    progress("quantize", 1.0, f"recipe: quant {recipe.quant}")
    if recipe.distill_epochs > 0:
        track.begin("distill", index=1, total=1, label=label,
                    budget_s=max(1.0, deadline - clock()))
        b = ev.distill(b, recipe.distill_epochs, max(1.0, deadline - clock()))
    else:
        progress("distill", 1.0, "recipe: no distillation")
    track.begin("measure", total=1)
    m = ev.measure([b])[0]
    c = _candidate(b.recipe, m, ev.baseline, constraints, recipe.distill_epochs > 0)
    status = "succeeded" if c.feasible else "constraints_unsatisfiable"
    return Outcome(status=status, best_index=0, candidates=[c], built=[b], front=[0])
