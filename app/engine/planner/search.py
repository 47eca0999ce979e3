"""The planner: sweep cheap candidates, distill the promising ones, choose the best feasible.

Structure decides cost, distillation decides accuracy (DESIGN §3). Size and latency of a
candidate are known after prune + quantize + export, before any training, so:

1. *Cheap phase*: every (prune ratio x quant scheme) of the grid is pruned (no training),
   quantized with calibration and exported to ONNX; all of them are measured in ONE interleaved
   latency run together with the baseline (so every ratio is side by side), and their quality
   is evaluated on held-out data as they are (no recovery).
   A quantization scheme that fails to build on the model is reported (``Outcome.warnings``)
   and replaced, at every prune ratio still to build, by its registered fallback
   (``schemes.fallback_for``: int8_static -> int8_static_onnx -> int8_dynamic).
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
4. *Finalists*: the chosen candidate and its ``FINALISTS - 1`` closest competitors (those
   that pass every rule but latency, in objective order) are re-measured together in one more
   side-by-side run with the baseline and an identical-model control, and the choice is made
   again on those figures (repeated if it falls on a candidate not re-measured yet).
5. *Polish*: a choice that met the quality limit untrained is distilled too when time is
   left (``polish``). Its structure, so its size, stays the same, and distillation only adds
   quality margin: the zoo ViT pruned 70 % int8 passed untrained on a 280-sample hold-out yet
   lost 1.0 point on the benchmark's unseen test split; polished (47 epochs) it scored 1.25
   points above fp32 there. The distilled copy replaces the choice when it passes every rule
   and scores higher on the hold-out.
6. No feasible candidate: the result is ``constraints_unsatisfiable`` with the closest one
   as ``best``: among those neither larger nor slower than the baseline when there are any,
   the least relative excess over the limits.

Determinism. Size, parameters and quality are deterministic for a fixed seed (pruning,
calibration and CPU training are). Latency is not, so it never decides between two candidates
on a small difference: ``smallest`` ranks by size, then by latency in 10 %-wide log buckets, then
grid order; ``fastest`` ranks by the 10 % latency bucket, then size, then grid order. Latency
limits are pass/fail on the median of per-round ratios of interleaved rounds, and the
never-slower rule on the interval of that ratio against the noise of an identical-model control
(``constraints``), so only a candidate within noise of a limit can change the outcome between
runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from app.engine.planner.constraints import (
    check,
    cost_reasons,
    never_worse_reasons,
    violation,
)
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
# Candidates re-measured together before choosing: the chosen one and its closest competitors
# (a noisy first measurement must neither ship a slower model nor hide a faster one).
FINALISTS = 3
FINALIST_ROUNDS = 3  # re-measurement runs at most (a new choice outside the finalists re-runs)


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

    def structure(self, recipe: Recipe) -> str:
        """Fingerprint of ``recipe``'s pruned model: equal when pruning changed nothing."""
        ...

    def distill(self, built: Any, epochs: int, time_budget_s: float,
                max_epochs: int | None = None) -> Any:
        """Quantization-aware KD of ``built``'s pruned model; returns the converted candidate.
        ``max_epochs``: the schedule may grow to that many epochs when the budget holds them."""
        ...


@dataclass(frozen=True)
class SearchSpace:
    """The candidate grid and the distillation effort."""

    prune_ratios: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7)
    quant_schemes: tuple[QuantScheme, ...] = ("int8_static", "none")
    importance: str = "l2"
    distill_epochs: int = 12
    # Epochs a distillation may grow to when its share of the time budget holds more
    # (stages.distill.DistillConfig.max_epochs); None = exactly ``distill_epochs``.
    max_distill_epochs: int | None = None
    # Distillation peak learning rate of every candidate; None = the model family's
    # (stages.distill.FAMILY_SCHEDULES: 5e-3 for BN CNNs / MLPs, 3e-4 for transformers).
    lr: float | None = None
    max_distill: int = 4  # candidates distilled at most
    min_distill_s: float = 5.0  # do not start a distillation with less time than this left
    # Distillation input mixing (Recipe.mixup) of every candidate; None = the model family's
    # (stages.distill.FAMILY_SCHEDULES: 0.4 for CNNs / MLPs, off for transformers, and off
    # below MIXUP_MIN_EPOCHS ``distill_epochs``).
    mixup: float | None = None

    def grid(self, seed: int) -> list[Recipe]:
        if self.lr is None or self.mixup is None:
            raise ValueError("SearchSpace.lr / mixup is unset: the pipeline fills the model "
                             "family's")
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


# A job's default search lets each distillation grow from 12 to this many epochs when its
# share of the budget holds them: in the zoo, HF ResNet pruned 70 % reached 98.9 % of a 100 %
# baseline in 12 epochs (5 s) and missed the 1-point limit by 3 samples of 280, with 485 s
# of its 600 s budget unused.
DEFAULT_MAX_EPOCHS = 48


def default_space(*, linear_heavy: bool, depthwise: bool = False) -> SearchSpace:
    """Grid by model kind: dynamic int8 is a candidate where Linear layers dominate the MACs;
    with depthwise convs, int8 with those kept fp32 is measured beside all-int8 (int8
    depthwise convs ran at 0.6x fp32 speed in ONNX Runtime on one CNN and 1.7x faster on
    another here: only a measurement decides). A scheme that fails on the model is replaced
    by its registered fallback (``schemes.fallback_for``) during the search."""
    if linear_heavy:
        return SearchSpace(quant_schemes=("int8_dynamic", "int8_static", "none"),
                           max_distill_epochs=DEFAULT_MAX_EPOCHS)
    if depthwise:
        return SearchSpace(quant_schemes=("int8_static", "int8_static_dw_fp32", "none"),
                           max_distill_epochs=DEFAULT_MAX_EPOCHS)
    return SearchSpace(max_distill_epochs=DEFAULT_MAX_EPOCHS)


@dataclass
class Outcome:
    status: str  # "succeeded" | "constraints_unsatisfiable"
    best_index: int
    candidates: list[Candidate]
    built: list[Any]  # parallel to candidates
    front: list[int]
    skipped: list[dict[str, str]] = field(default_factory=list)  # grid points that failed to build
    warnings: list[str] = field(default_factory=list)  # for the user, one line each
    remeasured: list[int] = field(default_factory=list)  # candidates re-timed as finalists
    # The polish of an untrained choice (module doc, step 5): the index of its distilled copy
    # and whether it replaced the choice; None when there was none.
    polished: dict[str, Any] | None = None

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
    # The closest one is the artifact a failed job still stores: one that is larger or slower
    # than the fp32 upload (MobileNetV2 int8 measured 1.30x slower beyond noise, yet was
    # "closest" on the sum of excesses) is never preferred to one that is neither.
    best = min(
        range(len(candidates)),
        key=lambda i: (bool(never_worse_reasons(candidates[i].metrics, baseline)),
                       violation(candidates[i].metrics, baseline, constraints),
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
    track.plan(builds=len(grid), epochs=space.max_distill_epochs or space.distill_epochs,
               distills=min(space.max_distill, math.ceil(math.log2(len(grid) + 1))))
    built: list[Any] = []
    skipped: list[dict[str, str]] = []
    warnings: list[str] = []
    failed: set[str] = set()  # quantization schemes that failed on this model
    build_s: list[float] = []  # seconds per cheap build: estimates convert + export after KD
    # A pruned model equal in structure to one already built (or to the baseline) is the same
    # candidate: built once, and the user is told that pruning changed nothing.
    seen: dict[tuple[str, str], float] = {}
    same_as: dict[float, float] = {}  # prune ratio -> the ratio it duplicates
    k = 0
    while k < len(grid):
        recipe = grid[k]
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
            if not seen:
                seen[(ev.structure(replace(recipe, prune_ratio=0.0)), "none")] = 0.0
            key = (ev.structure(recipe), recipe.quant)
            if key in seen:
                same_as[recipe.prune_ratio] = seen[key]
                k += 1
                continue
            seen[key] = recipe.prune_ratio
            built.append(ev.build(recipe))
            build_s.append(clock() - t0)
        except Exception as e:  # one grid point failing to build must not sink the search
            _reraise_control(e)
            error = f"{type(e).__name__}: {e}"
            skipped.append({"recipe": str(recipe.to_dict()), "error": error})
            if recipe.quant != "none" and recipe.quant not in failed:
                failed.add(recipe.quant)
                grid, line = _fall_back(grid, k, recipe.quant, failed, skipped)
                warnings.append(f"quantization {recipe.quant} failed on this model "
                                f"({_short(error)}); {line}")
                progress("quantize", k / max(len(grid), 1), warnings[-1])
                continue  # grid[k] is now the fallback (or the next candidate)
        progress("quantize", (k + 1) / len(grid), f"built {k + 1}/{len(grid)} candidates")
        k += 1
    if same_as:
        warnings.append(_duplicates_warning(same_as))
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
        remaining = deadline - clock() - _after_training_s(build_s)
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
        try:
            b2 = ev.distill(built[i], space.distill_epochs, budget, space.max_distill_epochs)
        except Exception as e:  # one scheme's QAT failing must not sink the search
            _reraise_control(e)
            error = f"{type(e).__name__}: {e}"
            skipped.append({"recipe": str(r.to_dict()), "error": f"distillation: {error}"})
            warnings.append(f"distillation of {r.quant} candidates failed on this model "
                            f"({_short(error)}); the search goes on without them")
            progress("distill", 1.0, warnings[-1])
            window = [j for j in window if candidates[j].recipe.quant != r.quant]
            continue
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

    progress("evaluate", 0.0, "re-measuring the finalists side by side")
    status, best, remeasured = confirm_finalists(ev, candidates, built, constraints)
    polished = None
    if status == "succeeded" and not candidates[best].distilled and space.max_distill > 0:
        status, best, polished = polish(ev, candidates, built, best, constraints, space,
                                        deadline - clock() - _after_training_s(build_s), track,
                                        progress, skipped)
    return Outcome(status=status, best_index=best, candidates=candidates, built=built,
                   front=pareto_front(candidates), skipped=skipped, warnings=warnings,
                   remeasured=remeasured, polished=polished)


def _after_training_s(build_s: Sequence[float]) -> float:
    """Seconds to keep for after a distillation: convert + export + measure, about three
    cheap builds' worth (median; loaded machines make the QAT convert and export slower than
    the cheap builds were)."""
    return 3.0 * sorted(build_s)[len(build_s) // 2] if build_s else 0.0


def polish(ev: Evaluator, candidates: list[Candidate], built: list[Any], best: int,
           constraints: Constraints, space: SearchSpace, remaining_s: float, track: Tracker,
           progress: Callable[[str, float, str], None],
           skipped: list[dict[str, str]]) -> tuple[str, int, dict[str, Any] | None]:
    """Distill the untrained choice ``best`` in the time left (module doc, step 5).

    The copy is measured side by side with the choice (same structure: only noise can tell
    their latency apart) and replaces it when it passes every rule and its hold-out quality
    is higher (or the re-measured choice failed a latency rule and the copy did not).
    Appends the copy to ``candidates`` / ``built``; returns the status, the chosen index and
    what happened (None when no time was left).
    """
    if remaining_s < space.min_distill_s:
        progress("distill", 1.0, f"no polish of the untrained choice: {remaining_s:.0f} s left")
        return "succeeded", best, None
    c = candidates[best]
    r = c.recipe
    label = f"prune {r.prune_ratio:.0%} {r.quant}"
    track.plan(distills=track.distills + 1)  # the search's own, then this one
    track.begin("distill", index=1, total=1, budget_s=remaining_s, label=f"polish {label}")
    progress("distill", 0.0, f"polishing the choice ({label} met the quality limit untrained): "
             f"distilling it for quality margin (budget {remaining_s:.0f} s)")
    try:
        b2 = ev.distill(built[best], space.distill_epochs, remaining_s, space.max_distill_epochs)
    except Exception as e:
        _reraise_control(e)
        skipped.append({"recipe": str(r.to_dict()),
                        "error": f"polish distillation: {type(e).__name__}: {e}"})
        progress("distill", 1.0, f"polish failed ({_short(f'{type(e).__name__}: {e}')}); "
                 "the untrained choice stands")
        return "succeeded", best, {"candidate": None, "replaced": False}
    m2, m1 = ev.measure([b2, built[best]])
    baseline = ev.baseline
    candidates[best] = _candidate(r, m1, baseline, constraints, False)
    c2 = _candidate(b2.recipe, m2, baseline, constraints, True)
    candidates.append(c2)
    built.append(b2)
    new = len(candidates) - 1
    replaced = c2.feasible and (m2.quality > m1.quality or not candidates[best].feasible)
    status = "succeeded"
    if replaced:
        best = new
    elif not candidates[best].feasible:
        # The re-measured choice fell out (latency noise) and its copy too: choose again.
        status, best = choose(candidates, baseline, constraints)
    progress("distill", 1.0, (
        f"polished: {label} distilled for {b2.recipe.distill_epochs} epochs, {m1.quality_kind} "
        f"{m1.quality:.4f} -> {m2.quality:.4f}: " + ("it replaces the untrained choice"
                                                      if replaced else
                                                      "no better; the untrained choice stands")))
    return status, best, {"candidate": new, "replaced": replaced}


def _reraise_control(e: Exception) -> None:
    """Cancellation and the time budget end the search; any other failure is one candidate's."""
    from app.engine.errors import Cancelled, TimeBudgetExceeded

    if isinstance(e, Cancelled | TimeBudgetExceeded):
        raise e


def _short(error: str, limit: int = 240) -> str:
    line = error.splitlines()[0] if error else error
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _fall_back(grid: list[Recipe], k: int, scheme: str, failed: set[str],
               skipped: list[dict[str, str]]) -> tuple[list[Recipe], str]:
    """Replace ``scheme`` in ``grid[k:]`` by its registered fallback; returns the new grid and
    the words for the user. A grid point whose fallback is already in the grid is dropped
    (recorded in ``skipped``): the scheme failed at one prune ratio, it fails at all of them.
    """
    from app.engine.schemes import fallback_for

    alt = fallback_for(scheme, failed)
    present = {(r.prune_ratio, r.quant) for r in grid}
    rest: list[Recipe] = []
    for r in grid[k:]:
        if r.quant != scheme:
            rest.append(r)
            continue
        if alt is None or (r.prune_ratio, alt) in present:
            if r is not grid[k]:
                skipped.append({"recipe": str(r.to_dict()),
                                "error": f"not built: {scheme} failed on this model"})
            continue
        present.add((r.prune_ratio, alt))
        rest.append(replace(r, quant=alt))
    line = f"trying {alt} instead" if alt is not None else "no fallback scheme left"
    return grid[:k] + rest, line


def _duplicates_warning(same_as: dict[float, float]) -> str:
    """One line: which prune ratios produced a model identical to a less pruned one."""
    by_target: dict[float, list[float]] = {}
    for ratio, target in sorted(same_as.items()):
        by_target.setdefault(target, []).append(ratio)
    parts = [f"prune {', '.join(f'{r:.0%}' for r in rs)} left the model as prune {t:.0%}"
             for t, rs in sorted(by_target.items())]
    return ("structured pruning changed nothing: " + "; ".join(parts)
            + " (same structure); those candidates were built once")


def finalists(candidates: Sequence[Candidate], best: int, baseline: Metrics,
              constraints: Constraints, exclude: set[int]) -> list[int]:
    """``best`` and its closest competitors: candidates that pass every rule but latency,
    in objective order (a re-measured latency can make them the choice)."""
    rivals = sorted((i for i, c in enumerate(candidates) if i != best and i not in exclude
                     and not check(c.metrics, baseline, constraints, latency=False)),
                    key=lambda i: rank_key(candidates[i], i, constraints.objective))
    return [best, *rivals[:FINALISTS - 1]]


def confirm_finalists(ev: Evaluator, candidates: list[Candidate], built: Sequence[Any],
                      constraints: Constraints) -> tuple[str, int, list[int]]:
    """Re-measure the finalists in one side-by-side run, update them, choose again.

    Repeats (at most ``FINALIST_ROUNDS`` runs) while the choice falls on a candidate that was
    not re-measured yet. Returns (status, chosen index, indices re-measured). ``candidates``
    is updated in place with the new metrics and feasibility.
    """
    baseline = ev.baseline
    done: list[int] = []
    status, best = choose(candidates, baseline, constraints)
    for _ in range(FINALIST_ROUNDS):
        if best in done:
            break
        group = finalists(candidates, best, baseline, constraints, set(done))
        for i, m in zip(group, ev.measure([built[i] for i in group]), strict=True):
            old = candidates[i]
            candidates[i] = _candidate(old.recipe, m, baseline, constraints, old.distilled)
        done.extend(group)
        status, best = choose(candidates, baseline, constraints)
    return status, best, done


def run_recipe(ev: Evaluator, recipe: Recipe, constraints: Constraints, *, deadline: float,
               on_progress: ProgressFn | None = None,
               clock: Callable[[], float] = time.monotonic,
               tracker: Tracker | None = None) -> Outcome:
    """An explicit recipe skips the search: build it, distill if asked, measure, check."""

    def progress(stage: str, frac: float, msg: str) -> None:
        if on_progress is not None:
            on_progress(stage, frac, msg)

    from app.engine.errors import EngineError, InvalidRecipe

    track = tracker or Tracker(deadline, clock)
    distills = int(recipe.distill_epochs > 0)
    label = f"prune {recipe.prune_ratio:.0%} {recipe.quant}"
    track.plan(builds=1, distills=distills, epochs=recipe.distill_epochs)
    track.begin("build", index=1, total=1, label=label)
    progress("prune", 0.0, f"recipe: prune {recipe.prune_ratio:.0%} ({recipe.importance})")
    try:
        b = ev.build(replace(recipe, distill_epochs=0))
    except EngineError:  # cancel, time budget, bad input: as they are
        raise
    except Exception as e:  # the stated recipe cannot be built: say which part and why
        raise InvalidRecipe(f"recipe quant {recipe.quant} (prune {recipe.prune_ratio:.0%}) "
                            f"failed on this model: {_short(f'{type(e).__name__}: {e}')}; "
                            "try another quant scheme") from e
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
