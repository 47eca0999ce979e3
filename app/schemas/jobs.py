"""Job wire contracts. Request bodies forbid unknown fields (a typo is a 422, not ignored)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from app.engine.schemes import NAMES as QUANT_NAMES
from app.schemas.common import ErrorCode

# The engine's registered quantization schemes (one enum in the OpenAPI document).
if TYPE_CHECKING:
    QuantName = str
else:
    QuantName = Literal[QUANT_NAMES]

JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
QualityMetricName = Literal["auto", "accuracy", "agreement", "cosine", "mse"]


class JobStage(StrEnum):
    """What a running job is doing: the engine's stages (``app.engine.types.STAGES``), then
    ``store`` (artifacts being written) and ``done``. tests/service/test_openapi.py fails when
    the engine gains a stage that is not listed here."""

    load = "load"
    baseline = "baseline"
    prune = "prune"
    quantize = "quantize"
    distill = "distill"
    export = "export"
    evaluate = "evaluate"
    store = "store"
    done = "done"


class ConstraintsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_size_mb: float | None = Field(None, gt=0, description="MB = 1e6 bytes of model.onnx")
    max_latency_ms: float | None = Field(None, gt=0, description="ONNX Runtime p50, ms")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="absolute, 0.01 = 1 pt")
    batch_size: int = Field(1, ge=1, le=4096)
    threads: int = Field(2, ge=1, le=256)
    objective: Literal["smallest", "fastest"] = "smallest"
    time_budget_s: float = Field(600.0, gt=0, le=7 * 24 * 3600)
    metric: QualityMetricName = Field(
        "auto", description="what max_accuracy_drop is measured in: auto = accuracy with "
        "labels (agreement without) for logits, cosine for embeddings, mse for one value per "
        "sample")

    def states_a_limit(self) -> bool:
        return any(v is not None for v in
                   (self.max_size_mb, self.max_latency_ms, self.max_accuracy_drop))


class RecipeIn(BaseModel):
    """An explicit recipe: skips the search and runs exactly this setting."""

    model_config = ConfigDict(extra="forbid")

    prune_ratio: float = Field(0.0, ge=0, le=0.95)
    prune_mode: Literal["structured", "unstructured"] = "structured"
    importance: Literal["l2", "taylor"] = "l2"
    round_to: int = Field(8, ge=1, le=1024)
    quant: QuantName = "int8_static"
    distill_epochs: int = Field(0, ge=0, le=1000)
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = Field(0, ge=0, le=2**31 - 1)  # the range of the job seed (an int4 column)
    # Distillation on mixed pairs of samples labelled by the teacher (float inputs only).
    mixup: float = Field(0.0, ge=0, le=10)
    # ONNX models only: op types left in fp32 by int8_static ("DepthwiseConv" = depthwise Conv).
    keep_fp32: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list,
                                                                  max_length=32)


# The rule of ``_something_stated`` in the OpenAPI document, so a schema-valid body is a
# valid body: NOT (no recipe AND no limit), i.e. a recipe, or constraints with at least one
# limit that is not null. Written with ``not`` rather than an ``anyOf`` of partial objects:
# generators (openapi-python-client) turn such an anyOf into a union of half models and drop
# JobCreate; ``not`` is validation only, and they ignore it.
LIMITS = ("max_size_mb", "max_latency_ms", "max_accuracy_drop")
_STATES_A_LIMIT: dict[str, Any] = {"not": {"properties": {
    "recipe": {"type": "null"},
    "constraints": {"properties": {name: {"type": "null"} for name in LIMITS}}}}}


# An id in a body: any string without NUL (Postgres text cannot hold one; unknown ids are 404).
RefId = Annotated[str, Field(max_length=64, pattern=r"^[^\x00]*$")]


class JobCreate(BaseModel):
    """A job: at least one limit in ``constraints`` (size, latency, accuracy drop), or an
    explicit ``recipe`` that skips the search."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_STATES_A_LIMIT)

    model_id: RefId
    dataset_id: RefId
    eval_dataset_id: RefId | None = None
    constraints: ConstraintsIn = Field(default_factory=lambda: ConstraintsIn.model_validate({}))
    recipe: RecipeIn | None = None
    device: Literal["cpu", "cuda", "auto"] = "auto"
    seed: int = Field(0, ge=0, le=2**31 - 1)  # an int4 column
    # This job's own webhook (README "Events and webhooks"): its outcome is POSTed there,
    # signed with webhook_secret (whsec_ + base64; required with webhook_url).
    webhook_url: str | None = Field(None, max_length=2048)
    webhook_secret: str | None = Field(None, max_length=128)

    @model_validator(mode="after")
    def _something_stated(self) -> JobCreate:
        if self.recipe is None and not self.constraints.states_a_limit():
            raise ValueError("state at least one of constraints.max_size_mb, "
                             "constraints.max_latency_ms, constraints.max_accuracy_drop, "
                             "or give a recipe")
        return self


class JobActivity(BaseModel):
    """What a running job is doing: its stage, the candidate being built or distilled (1-based
    index of the planned total) and, while distilling, the epochs finished of those planned."""

    stage: str
    candidate: str | None = None
    candidate_index: int | None = None
    candidates_total: int | None = None
    epoch: int | None = None
    epochs_total: int | None = None


class JobError(BaseModel):
    code: ErrorCode
    detail: str | None = None


# --- the job's result, as the engine reports it (app/engine/pipeline.py ``report``) ---------
# Nested objects allow extra fields: the engine adds figures (warnings, noise, ...) without
# breaking a client generated from an older document.


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ConstraintsOut(ConstraintsIn):
    """The job's constraints, defaults filled in."""

    model_config = ConfigDict(extra="allow")


class RecipeOut(RecipeIn):
    """A recipe as run (``distill_epochs`` = the epochs actually run)."""

    model_config = ConfigDict(extra="allow")


class MetricsOut(_Open):
    """One model measured on the target runtime (ONNX Runtime) on the held-out data."""

    quality: float = Field(description="accuracy with labels, else fidelity to the original")
    quality_kind: str = Field(description="accuracy, agreement or cosine (what quality is)")
    latency_p50_ms: float = Field(description="ONNX Runtime p50 at the constraints' batch "
                                              "size and threads, ms")
    latency_p95_ms: float
    size_bytes: int = Field(description="bytes of the ONNX file")
    parameters: int
    macs: int = Field(description="multiply-accumulates of one sample")
    per_class_accuracy: dict[str, float] | None = None
    agreement: float | None = Field(None, description="top-1 agreement with the original")


class CandidateOut(_Open):
    """One evaluated point of the search; ``id`` is its position in ``candidates``."""

    id: int
    recipe: RecipeOut
    metrics: MetricsOut
    feasible: bool = Field(description="meets every constraint")
    distilled: bool
    reasons: list[str] = Field(default_factory=list, description="why not feasible")


class ParetoPoint(BaseModel):
    """A candidate on the Pareto front (size x latency x quality): its id and its metrics."""

    candidate_id: int
    metrics: MetricsOut


class Ratios(_Open):
    size: float = Field(description="original size / compressed size")
    speedup: float = Field(description="original p50 / compressed p50")
    quality_drop: float = Field(description="original quality - compressed quality")


class FileEntry(_Open):
    file: str
    sha256: str
    size_bytes: int


class Manifest(_Open):
    """sha256 of every input and output, and the library versions of the run."""

    inputs: dict[str, FileEntry]
    outputs: dict[str, FileEntry]
    library_versions: dict[str, str]


class DataSplit(_Open):
    """Samples used: training, distillation validation, held-out evaluation."""

    train: int
    validation: int
    holdout: int
    holdout_source: str = Field(description="eval_data (a separate upload) or split")


class SkippedCandidate(_Open):
    recipe: str
    error: str


class JobSpecOut(_Open):
    constraints: ConstraintsOut
    recipe: RecipeOut | None = None
    device: str
    seed: int


class JobReport(_Open):
    """The job's result (report.json): the baseline, the chosen candidate, every candidate,
    the Pareto front, the ratios and the manifest. Also stored when no candidate met the
    constraints (``status: constraints_unsatisfiable``)."""

    status: Literal["succeeded", "constraints_unsatisfiable"]
    message: str
    seed: int
    device: str
    spec: JobSpecOut | None = None
    constraints: ConstraintsOut
    recipe: RecipeOut
    baseline: MetricsOut
    chosen: CandidateOut
    chosen_index: int = Field(description="id of the chosen candidate")
    candidates: list[CandidateOut]
    pareto_front: list[int] = Field(description="ids of the candidates on the Pareto front")
    skipped: list[SkippedCandidate] = Field(default_factory=list,
                                            description="grid points that failed to build")
    ratios: Ratios
    warnings: list[str] = Field(default_factory=list)
    onnx_parity_max_abs: float | None = Field(None, description="ONNX Runtime vs torch")
    data: DataSplit | None = None
    elapsed_s: float | None = None
    manifest: Manifest | None = None

    @model_validator(mode="before")
    @classmethod
    def _number_candidates(cls, data: Any) -> Any:
        """The engine's report lists candidates without ids: the id is the position."""
        if not isinstance(data, dict) or not isinstance(data.get("candidates"), list):
            return data
        out = dict(data)
        out["candidates"] = [{**c, "id": i} if isinstance(c, dict) and "id" not in c else c
                             for i, c in enumerate(data["candidates"])]
        chosen, index = data.get("chosen"), data.get("chosen_index")
        if isinstance(chosen, dict) and "id" not in chosen and isinstance(index, int):
            out["chosen"] = {**chosen, "id": index}
        return out

    @computed_field  # type: ignore[prop-decorator]
    @property
    def pareto(self) -> list[ParetoPoint]:
        """The Pareto front with each candidate's metrics."""
        by_id = {c.id: c for c in self.candidates}
        return [ParetoPoint(candidate_id=i, metrics=by_id[i].metrics)
                for i in self.pareto_front if i in by_id]


# --- the job resource ------------------------------------------------------------------------


class BestOut(MetricsOut):
    """The chosen candidate's metrics with its recipe."""

    recipe: RecipeOut
    feasible: bool
    reasons: list[str] = Field(default_factory=list)


class CandidateSummary(_Open):
    recipe: RecipeOut
    feasible: bool
    distilled: bool
    quality: float
    latency_p50_ms: float
    size_bytes: int
    reasons: list[str] = Field(default_factory=list)


class JobMetrics(_Open):
    """A finished job's figures (the full result is ``GET /v1/jobs/{id}/report``)."""

    baseline: MetricsOut
    best: BestOut
    candidates: list[CandidateSummary]
    stage_seconds: dict[str, float] = Field(default_factory=dict,
                                            description="wall time per stage, seconds")


class JobOut(BaseModel):
    id: str
    status: JobStatusName
    stage: JobStage | None
    progress: float = Field(description="0..1")
    eta_s: float | None = Field(None, description="expected seconds to the end of the run")
    activity: JobActivity | None = None
    message: str | None
    attempt: int
    max_attempts: int
    model_id: str
    dataset_id: str
    eval_dataset_id: str | None
    device: str
    queue: str
    constraints: ConstraintsOut
    recipe: RecipeOut | None
    metrics: JobMetrics | None
    error: JobError | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = None


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    sha256: str
    size_bytes: int
    content_type: str
    created_at: datetime


class ArtifactList(BaseModel):
    items: list[ArtifactOut]
