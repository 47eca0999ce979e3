"""Quality of a model's outputs on held-out data, and how sure a measured drop is.

Every metric is a fraction, higher is better, and a mean of per-sample scores, so a candidate
and the fp32 baseline are compared sample by sample on the same hold-out (paired):

- ``accuracy``: top-1 prediction equals the label. Needs labels and (N, C) logits, labels < C.
- ``agreement``: top-1 equals the fp32 reference's top-1 (classifier without labels). The
  baseline agrees with itself: 1.0.
- ``cosine``: cosine similarity of a sample's flattened output to the reference's. Baseline 1.0.
- ``mse``: ``1 - MSE / Var(reference)``, the coefficient of determination R^2 with the fp32
  outputs as the target (``Var`` = variance over samples of each output element, averaged over
  elements: scikit-learn's variance-weighted R^2). Baseline 1.0; a drop of 0.01 means a squared
  error of 1 % of the reference outputs' variance.

``auto`` (:func:`resolve_metric`), from the fp32 reference outputs on the hold-out:

1. one value per sample, (N,) or (N, 1): ``mse`` (a regression output: argmax is meaningless and
   the cosine of a scalar is only its sign);
2. (N, C > 1) whose non-zero rows all have unit L2 norm (within ``UNIT_NORM_TOL``): an embedding
   (sentence encoders normalise; logits essentially never have unit norm) -> ``cosine``; labels,
   if any, are not used;
3. any other (N, C > 1) output is logits (or probabilities): ``accuracy`` with labels,
   ``agreement`` without;
4. any other rank, (N, T, D) hidden states, feature maps: ``cosine``.

An un-normalised (N, D) embedding cannot be told from logits by its values: pass
``metric="cosine"``. Labels that do not fit a classifier's width (a class id >= C) are
``InvalidData`` whenever the metric is ``accuracy`` or ``agreement`` (distillation trains on
them with cross-entropy), with that hint in the message.

Confidence interval of a drop (``drop_interval``, 95 %, for ``baseline - candidate``):

- ``accuracy``: Newcombe's hybrid score interval for paired proportions (Newcombe 1998, method
  10, square-and-add of Wilson intervals; recommended by Fagerland, Lydersen & Laake 2014). A
  bootstrap or a normal interval collapses to [0, 0] when no sample changed, which is exactly
  the saturated hold-out (baseline 100 %) where the data say least; Wilson-based bounds do not.
- ``agreement``: the Wilson score interval of the disagreement rate (the baseline's own
  agreement is exactly 1: only the candidate's rate is uncertain).
- ``cosine`` / ``mse``: per-sample drops are continuous, >= 0 and skewed (most near 0, a few
  large): percentile paired bootstrap of their mean, ``BOOTSTRAP_RESAMPLES`` resamples, fixed
  seed (deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

from app.engine.errors import InvalidData, InvalidRecipe
from app.engine.types import QualityKind, QualityMetric

UNIT_NORM_TOL = 1e-3  # |row L2 norm - 1|: fp32 F.normalize is within ~1e-6
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# Below this many held-out samples no interval is trustworthy (the Wilson bounds of a 100 %
# score are still +-3.7 points at n = 100), whatever the limit.
MIN_HOLDOUT_SAMPLES = 200
EVAL_HINT = ("pass a separate, larger evaluation set (--eval-data in `modelpress compress`, "
             "eval_dataset_id in POST /v1/jobs)")

Task = Literal["classifier", "embedding"]


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(len(a), -1).astype(np.float64)


def is_unit_norm(outputs: np.ndarray) -> bool:
    """Whether every non-zero row of a 2-D output has L2 norm 1 (at least one row non-zero)."""
    if outputs.ndim != 2 or len(outputs) == 0:
        return False
    norms = np.linalg.norm(outputs.astype(np.float64), axis=1)
    nonzero = norms > 0
    return bool(nonzero.any() and np.all(np.abs(norms[nonzero] - 1.0) <= UNIT_NORM_TOL))


def resolve_metric(
    requested: QualityMetric, reference: np.ndarray, labels: np.ndarray | None, *,
    label_max: int | None = None, source: str = "the held-out data",
) -> QualityKind:
    """The metric to judge by (module doc), or InvalidRecipe / InvalidData if it cannot apply.

    ``reference``: the fp32 model's outputs on the hold-out; ``labels``: the hold-out's labels;
    ``label_max``: the largest class id in all the data (training part included, default the
    hold-out's). ``source`` names the hold-out in messages.

    >>> resolve_metric("auto", np.eye(3, dtype=np.float32), None)
    'cosine'
    """
    kind: QualityKind
    if requested != "auto":
        kind = requested
    elif reference.ndim == 1 or (reference.ndim == 2 and reference.shape[1] == 1):
        kind = "mse"
    elif reference.ndim == 2 and is_unit_norm(reference):
        kind = "cosine"
    elif reference.ndim == 2:
        kind = "accuracy" if labels is not None else "agreement"
    else:
        kind = "cosine"
    top = label_max if label_max is not None else (
        None if labels is None or len(labels) == 0 else int(labels.max()))
    check_declared(kind, reference.shape, has_labels=labels is not None, label_max=top,
                   source=source)
    if kind == "mse" and len(reference) > 1 and _variance(reference) == 0.0:
        raise InvalidData(f"metric 'mse': the model's outputs are constant over {source} "
                          "(variance 0), so 1 - MSE/Var is undefined: use more varied data",
                          details={"metric": kind})
    return kind


def check_declared(
    metric: QualityMetric, output_shape: Sequence[int | None] | None, *, has_labels: bool,
    label_max: int | None, source: str,
) -> None:
    """What can be checked of ``metric`` from shapes and a label summary alone, before any run
    (the service calls it when a job is submitted; ``resolve_metric`` on the real outputs).

    ``output_shape``: the model's first output, dim 0 = samples, None = unknown dim (the whole
    shape None when unknown); ``has_labels``: the hold-out has labels; ``label_max``: the
    largest class id anywhere in the data. Raises InvalidRecipe (the output does not fit the
    metric) or InvalidData (labels missing for accuracy, or a class id >= the output width).
    """
    dims = None if output_shape is None else tuple(output_shape)[1:]
    shape = "?" if dims is None else "(N, " + ", ".join(
        "?" if d is None else str(d) for d in dims) + ")"
    known = dims is not None and all(d is not None for d in dims)
    per_sample = math.prod(d for d in dims if d is not None) if known and dims else 1
    if metric in ("accuracy", "agreement") and dims is not None and (
            len(dims) != 1 or (dims[0] is not None and dims[0] <= 1)):
        raise InvalidRecipe(f"metric {metric!r} needs (N, C) logits with C > 1, but the model "
                            f"outputs {shape}: use 'cosine' or 'mse'",
                            details={"metric": metric, "output_shape": shape})
    if metric == "accuracy" and not has_labels:
        raise InvalidData(f"metric 'accuracy' needs labels, but {source} has no 'labels' key: "
                          "add integer class ids, or use metric 'agreement' (fidelity to the "
                          "fp32 model)", details={"input": "labels", "metric": metric})
    if metric == "cosine" and known and per_sample == 1:
        raise InvalidRecipe(f"metric 'cosine' of one value per sample {shape} is only its sign: "
                            "use 'mse'", details={"metric": metric})
    width = dims[0] if dims is not None and len(dims) == 1 else None
    if metric in ("accuracy", "agreement") and label_max is not None and width is not None \
            and label_max >= width:
        raise InvalidData(
            f"input 'labels': class ids go up to {label_max}, but the model outputs {width} "
            f"values per sample {shape}, i.e. class ids 0..{width - 1}: fix the labels, or if "
            "the output is an embedding rather than logits set the constraint metric to "
            "'cosine' (labels are then not used)",
            details={"input": "labels", "max_label": label_max, "output_width": width})


def _variance(reference: np.ndarray) -> float:
    """Var(reference): per-element variance over samples, averaged over elements."""
    return float(_rows(reference).var(axis=0).mean())


@dataclass(frozen=True)
class Score:
    quality: float
    per_sample: np.ndarray  # float64 (N,), its mean is ``quality``
    per_class: dict[str, float] | None = None  # accuracy only, keyed by class id as str
    agreement: float | None = None  # top-1 agreement with the reference, classifiers only


class Scorer:
    """Scores outputs against one hold-out's fp32 reference with a resolved metric."""

    def __init__(self, kind: QualityKind, reference: np.ndarray,
                 labels: np.ndarray | None) -> None:
        self.kind = kind
        self.reference = reference
        self.labels = labels if kind == "accuracy" else None
        self._ref_top1 = reference.argmax(axis=1) if kind in ("accuracy", "agreement") else None
        self._var = _variance(reference) if kind == "mse" else 0.0

    @classmethod
    def resolve(cls, requested: QualityMetric, reference: np.ndarray,
                labels: np.ndarray | None, *, label_max: int | None = None,
                source: str = "the held-out data") -> Scorer:
        kind = resolve_metric(requested, reference, labels, label_max=label_max, source=source)
        return cls(kind, reference, labels)

    @property
    def task(self) -> Task:
        """What distillation should train for: logits (KL + CE) or outputs (MSE + cosine)."""
        return "classifier" if self.kind in ("accuracy", "agreement") else "embedding"

    def score(self, outputs: np.ndarray) -> Score:
        ref = self.reference
        if outputs.shape != ref.shape:
            raise ValueError(f"outputs {outputs.shape} vs reference {ref.shape}")
        if self.kind in ("accuracy", "agreement"):
            assert self._ref_top1 is not None
            pred = outputs.argmax(axis=1)
            agree = (pred == self._ref_top1).astype(np.float64)
            agreement = float(agree.mean())
            if self.labels is None:
                return Score(agreement, agree, None, agreement)
            correct = (pred == self.labels).astype(np.float64)
            per_class = {str(int(c)): float(correct[self.labels == c].mean())
                         for c in np.unique(self.labels)}
            return Score(float(correct.mean()), correct, per_class, agreement)
        if self.kind == "cosine":
            sims = cosines(outputs, ref)
            return Score(float(sims.mean()), sims)
        err = ((_rows(outputs) - _rows(ref)) ** 2).mean(axis=1)
        scores = 1.0 - err / self._var if self._var > 0 else np.where(err == 0, 1.0, 0.0)
        return Score(float(scores.mean()), scores)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarity of flattened outputs; two all-zero rows count as 1."""
    x, y = _rows(a), _rows(b)
    num = (x * y).sum(axis=1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    both_zero = (np.abs(x).sum(axis=1) == 0) & (np.abs(y).sum(axis=1) == 0)
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.where(both_zero, 1.0, 0.0))


# ---------------------------------------------------------------------------- intervals


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(k: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n."""
    if n <= 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_paired(base: np.ndarray, cand: np.ndarray,
                    confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Interval of ``mean(base) - mean(cand)`` for paired 0/1 outcomes (Newcombe method 10)."""
    b1, c1 = base.astype(bool), cand.astype(bool)
    n = len(b1)
    a = int(np.sum(b1 & c1))  # both right
    b = int(np.sum(b1 & ~c1))  # only the baseline right
    c = int(np.sum(~b1 & c1))  # only the candidate right
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, confidence)
    l2, u2 = wilson(a + c, n, confidence)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(margins) if margins > 0 else 0.0
    diff = p1 - p2
    lo = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)
                              + (u2 - p2) ** 2))
    hi = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2)
                              + (p2 - l2) ** 2))
    return max(-1.0, lo), min(1.0, hi)


def paired_bootstrap(drops: np.ndarray, confidence: float = CONFIDENCE, *,
                     resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-sample drops (fixed seed)."""
    n = len(drops)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # Chunks of resamples keep the index matrix small (n = 10^5 samples: 8 MB per 10 rows).
    step = max(1, 2_000_000 // max(n, 1))
    for i in range(0, resamples, step):
        k = min(step, resamples - i)
        means[i:i + k] = drops[rng.integers(0, n, size=(k, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def drop_interval(kind: QualityKind, base: np.ndarray, cand: np.ndarray,
                  confidence: float = CONFIDENCE) -> tuple[float, float]:
    """``confidence`` interval of the quality drop ``mean(base) - mean(cand)`` (module doc)."""
    if len(base) != len(cand) or len(base) == 0:
        raise ValueError(f"paired scores need equal, non-zero lengths ({len(base)}, {len(cand)})")
    if kind == "accuracy":
        return newcombe_paired(base, cand, confidence)
    if kind == "agreement":
        return wilson(float(np.sum(cand == 0)), len(cand), confidence)
    return paired_bootstrap(base.astype(np.float64) - cand.astype(np.float64), confidence)


def holdout_warnings(
    kind: QualityKind, baseline_quality: float, drop_ci: tuple[float, float] | None,
    samples: int, max_drop: float | None,
) -> list[str]:
    """Why the hold-out cannot judge ``max_drop`` (one line each; empty when it can).

    ``drop_ci`` is the chosen candidate's interval. Checks: fewer than MIN_HOLDOUT_SAMPLES
    samples; a half-width larger than the limit; a baseline accuracy of 100 % (every error of
    a candidate counts, none of its fixes can: the hold-out is too easy to rank candidates).
    """
    out: list[str] = []

    def fmt(x: float, sign: str = "+") -> str:  # accuracy / agreement in points, else fractions
        if kind in ("accuracy", "agreement"):
            return f"{x * 100:{sign}.2f} points"
        return f"{x:{sign}.4f}"

    if samples < MIN_HOLDOUT_SAMPLES:
        out.append(f"the hold-out has only {samples} samples (fewer than "
                   f"{MIN_HOLDOUT_SAMPLES}): quality figures are rough; {EVAL_HINT}")
    if drop_ci is not None and max_drop is not None:
        half = (drop_ci[1] - drop_ci[0]) / 2
        if half > max_drop:
            need = max(MIN_HOLDOUT_SAMPLES, math.ceil(samples * (half / max(max_drop, 1e-4))
                                                      ** 2))
            out.append(
                f"the hold-out ({samples} samples) is too small to judge max_accuracy_drop "
                f"{fmt(max_drop, '')}: the chosen candidate's {kind} drop has a {CONFIDENCE:.0%} "
                f"interval [{fmt(drop_ci[0])}, {fmt(drop_ci[1])}] (half-width {fmt(half, '')}); "
                f"{EVAL_HINT} of about {need} samples or more")
    if kind == "accuracy" and baseline_quality >= 1.0:
        out.append(f"the fp32 baseline scores 100 % accuracy on the {samples} held-out "
                   "samples: the hold-out is saturated and cannot show how much a candidate "
                   f"loses on harder data; {EVAL_HINT}")
    return out


__all__ = [
    "Score",
    "Scorer",
    "check_declared",
    "cosines",
    "drop_interval",
    "holdout_warnings",
    "is_unit_norm",
    "newcombe_paired",
    "paired_bootstrap",
    "resolve_metric",
    "wilson",
]
