"""Job wire contracts. Request bodies forbid unknown fields (a typo is a 422, not ignored)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

JobStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ConstraintsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_size_mb: float | None = Field(None, gt=0, description="MB = 1e6 bytes of model.onnx")
    max_latency_ms: float | None = Field(None, gt=0, description="ONNX Runtime p50, ms")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="absolute, 0.01 = 1 pt")
    batch_size: int = Field(1, ge=1, le=4096)
    threads: int = Field(2, ge=1, le=256)
    objective: Literal["smallest", "fastest"] = "smallest"
    time_budget_s: float = Field(600.0, gt=0, le=7 * 24 * 3600)

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
    quant: Literal["none", "int8_static", "int8_dynamic", "fp16"] = "int8_static"
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
# valid body: a recipe, or constraints with at least one limit that is not null.
_STATES_A_LIMIT: dict[str, Any] = {"anyOf": [
    {"required": ["recipe"], "properties": {"recipe": {"type": "object"}}},
    {"required": ["constraints"], "properties": {"constraints": {"anyOf": [
        {"required": [name], "properties": {name: {"type": "number"}}}
        for name in ("max_size_mb", "max_latency_ms", "max_accuracy_drop")]}}},
]}


# An id in a body: any string without NUL (Postgres text cannot hold one; unknown ids are 404).
RefId = Annotated[str, Field(max_length=64, pattern=r"^[^\x00]*$")]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_STATES_A_LIMIT)

    model_id: RefId
    dataset_id: RefId
    eval_dataset_id: RefId | None = None
    constraints: ConstraintsIn = Field(default_factory=lambda: ConstraintsIn.model_validate({}))
    recipe: RecipeIn | None = None
    device: Literal["cpu", "cuda", "auto"] = "auto"
    seed: int = Field(0, ge=0, le=2**31 - 1)  # an int4 column

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
    code: str
    detail: str | None = None


class JobOut(BaseModel):
    id: str
    status: JobStatusName
    stage: str | None
    progress: float
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
    constraints: dict[str, Any]
    recipe: dict[str, Any] | None
    metrics: dict[str, Any] | None
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
