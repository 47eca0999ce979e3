"""Typed data that crosses the engine boundary.

Everything here is a frozen dataclass that round-trips through JSON (``to_dict`` /
``from_dict``), so a recipe stored in a job row can be re-run exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# (stage, fraction of that stage done in [0, 1], human message). May raise errors.Cancelled.
ProgressFn = Callable[[str, float, str], None]

Objective = Literal["smallest", "fastest"]
# A name registered in ``app.engine.schemes`` (``schemes.NAMES``); ``schemes.get`` checks it.
QuantScheme = str
Importance = Literal["l2", "taylor"]
PruneMode = Literal["structured", "unstructured"]
Device = Literal["cpu", "cuda", "auto"]
# How quality is judged (stages/quality.py): "auto" picks one of QualityKind from the outputs.
QualityKind = Literal["accuracy", "agreement", "cosine", "mse"]
QualityMetric = Literal["auto", "accuracy", "agreement", "cosine", "mse"]

@dataclass(frozen=True)
class Activity:
    """What a run is doing now: the stage, the candidate (1-based index of the planned total)
    being built or distilled, and during a distillation the epochs finished of those planned."""

    stage: str
    candidate: str | None = None  # e.g. "prune 30% int8_static"
    candidate_index: int | None = None
    candidates_total: int | None = None
    epoch: int | None = None
    epochs_total: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ProgressStatus:
    """Overall progress of a run (``progress.Tracker``): monotonic in [0, 1], ETA in seconds
    (None until the planner has said what it will do)."""

    overall: float
    eta_s: float | None
    activity: Activity


# Called right before each ProgressFn call with the run's overall status. May raise too.
StatusFn = Callable[[ProgressStatus], None]

STAGES = ("load", "baseline", "prune", "quantize", "distill", "export", "evaluate")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, shape (None = dynamic dim), numpy dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


@dataclass(frozen=True)
class ModelInfo:
    """What the sandboxed loader learned about an uploaded model without trusting it."""

    format: Literal["pt2", "onnx"]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: int
    size_bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelInfo:
        def spec(x: Mapping[str, Any]) -> TensorSpec:
            return TensorSpec(x["name"], tuple(x["shape"]), x["dtype"])

        return cls(
            format=d["format"],
            inputs=tuple(spec(x) for x in d["inputs"]),
            outputs=tuple(spec(x) for x in d["outputs"]),
            parameters=int(d["parameters"]),
            size_bytes=int(d["size_bytes"]),
            sha256=d["sha256"],
        )


@dataclass(frozen=True)
class DatasetInfo:
    """Summary of a validated data file: sample count, per-input shapes, label facts."""

    samples: int
    inputs: tuple[TensorSpec, ...]
    has_labels: bool
    num_classes: int | None
    sha256: str
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Constraints:
    """Targets the compressed model must meet. ``None`` means "no limit on this axis"."""

    max_size_mb: float | None = None  # MB = 1e6 bytes, of the ONNX artifact on disk
    max_latency_ms: float | None = None  # ORT p50 at batch_size / threads
    max_accuracy_drop: float | None = None  # absolute, in [0, 1] (0.01 = one point)
    batch_size: int = 1
    threads: int = 2
    objective: Objective = "smallest"
    time_budget_s: float = 600.0  # whole run, seconds
    metric: QualityMetric = "auto"  # what max_accuracy_drop is measured in (stages/quality.py)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Constraints:
        return cls(**dict(d))


@dataclass(frozen=True)
class Recipe:
    """One concrete compression setting: what the planner searches over."""

    prune_ratio: float = 0.0  # fraction of channels removed in [0, 0.95]
    prune_mode: PruneMode = "structured"
    importance: Importance = "l2"
    round_to: int = 8  # keep pruned widths multiples of this (kernel-friendly)
    quant: QuantScheme = "int8_static"
    distill_epochs: int = 0  # 0 = no distillation
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the KL term vs cross-entropy
    lr: float = 1e-3
    seed: int = 0
    mixup: float = 0.0  # Beta(mixup, mixup) input mixing during distillation; 0 = off
    # ONNX input only: op types int8 leaves in fp32 ("DepthwiseConv" = Conv with group ==
    # channels), the per-op-type fallback where int8 loses on the target runtime.
    keep_fp32: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "keep_fp32": list(self.keep_fp32)}  # as in JSON

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        args = dict(d)
        if "keep_fp32" in args:  # a JSON list
            args["keep_fp32"] = tuple(args["keep_fp32"])
        return cls(**args)


@dataclass(frozen=True)
class JobSpec:
    """Everything a run needs besides the files: constraints, or a recipe that skips search."""

    constraints: Constraints = field(default_factory=Constraints)
    recipe: Recipe | None = None
    device: Device = "auto"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "constraints": self.constraints.to_dict(),
            "recipe": None if self.recipe is None else self.recipe.to_dict(),
            "device": self.device,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        recipe = d.get("recipe")
        return cls(
            constraints=Constraints.from_dict(d.get("constraints") or {}),
            recipe=None if recipe is None else Recipe.from_dict(recipe),
            device=d.get("device", "auto"),
            seed=int(d.get("seed", 0)),
        )


@dataclass(frozen=True)
class LatencyStats:
    """A candidate's latency relative to the fp32 baseline, measured side by side with an
    identical-model control in the same interleaved rounds (``stages.evaluate``)."""

    ratio: float  # candidate / baseline (median of per-round ratios); < 1 is faster
    ratio_low: float  # confidence interval of ``ratio`` at ``confidence``
    ratio_high: float
    best_round: float  # fastest round of the candidate / fastest round of the baseline
    noise: float  # the control's band in that run: 0.04 = an identical model within +-4 %
    control_ratio: float  # the identical model / baseline, same statistic as ``ratio``
    rounds: int
    confidence: float


@dataclass
class Metrics:
    """Measured figures of one model on the target runtime (ONNX Runtime)."""

    quality: float  # accuracy with labels, else fidelity to the original
    quality_kind: QualityKind
    latency_p50_ms: float
    latency_p95_ms: float
    size_bytes: int
    parameters: int
    macs: int
    per_class_accuracy: dict[str, float] | None = None
    agreement: float | None = None  # top-1 agreement with the teacher, classifiers only
    # 95 % interval of the drop (baseline - quality) on the same held-out samples (paired);
    # None for the baseline itself. Method per metric: stages/quality.py.
    quality_drop_ci95: tuple[float, float] | None = None
    latency: LatencyStats | None = None  # side-by-side ratio to the baseline (candidates)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Candidate:
    """One evaluated point of the search."""

    recipe: Recipe
    metrics: Metrics
    feasible: bool
    distilled: bool
    reasons: list[str] = field(default_factory=list)  # why infeasible, one line each

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(),
            "metrics": self.metrics.to_dict(),
            "feasible": self.feasible,
            "distilled": self.distilled,
            "reasons": list(self.reasons),
        }


@dataclass
class Result:
    """Outcome of ``pipeline.run``.

    ``status`` is ``succeeded`` when ``best`` meets every constraint, else
    ``constraints_unsatisfiable``; in both cases ``best``, ``candidates`` and the artifacts
    of the best candidate are present.
    """

    status: Literal["succeeded", "constraints_unsatisfiable"]
    baseline: Metrics
    best: Candidate
    candidates: list[Candidate]
    artifacts: dict[str, Path]  # name ("model.onnx", "model.pt2", "report.json", ...) -> file
    report: dict[str, Any]
    message: str = ""
    # Plain lines for the user, one each (CLI, job result, report.json "warnings"): e.g. a
    # hold-out too small to judge the limit, a quantization scheme that failed on this model.
    warnings: list[str] = field(default_factory=list)
