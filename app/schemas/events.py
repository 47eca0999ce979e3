"""The job event stream (GET /v1/jobs/{id}/events) and webhook wire contracts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.jobs import JobError, JobStatusName

EventType = Literal["stage", "progress", "candidate", "outcome"]
WebhookEventType = Literal["job.stage", "job.succeeded", "job.failed", "job.cancelled"]
TERMINAL_WEBHOOK_EVENTS: list[WebhookEventType] = ["job.succeeded", "job.failed",
                                                   "job.cancelled"]


class CandidateEvent(BaseModel):
    """A measured candidate, as in the job's ``metrics.candidates``."""

    index: int = Field(description="position in the job's candidate list (search order)")
    recipe: dict[str, Any]
    feasible: bool
    distilled: bool
    quality: float | None
    latency_p50_ms: float | None
    size_bytes: int | None
    reasons: list[str]


class JobEventData(BaseModel):
    """The ``data:`` JSON of one server-sent event; ``id`` and ``type`` repeat the SSE
    ``id:`` and ``event:`` lines. The job's state as of this event."""

    id: int = Field(description="per-job event id: 1, 2, ... (send it back as Last-Event-ID)")
    type: EventType
    job_id: str
    status: JobStatusName
    stage: str | None
    progress: float = Field(description="0..1 over the whole job")
    message: str | None
    at: datetime = Field(description="when the event was recorded (UTC)")
    candidate: CandidateEvent | None = Field(None, description="type=candidate only")
    error: JobError | None = Field(None, description="type=outcome of a failed or cancelled job")


class WebhookPayload(BaseModel):
    """The JSON body POSTed to a webhook endpoint (Standard Webhooks envelope)."""

    type: WebhookEventType
    timestamp: datetime
    data: JobEventData


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, description="http(s) URL the events are POSTed to")
    event_types: list[WebhookEventType] = Field(
        default_factory=lambda: list(TERMINAL_WEBHOOK_EVENTS), min_length=1)
    description: str | None = Field(None, max_length=500)
    secret: str | None = Field(
        None, max_length=128,
        description="whsec_ + base64 of 24-64 random bytes; generated when omitted")


class WebhookUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, max_length=2048)
    event_types: list[WebhookEventType] | None = Field(None, min_length=1)
    description: str | None = Field(None, max_length=500)
    enabled: bool | None = None


class WebhookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    url: str
    job_id: str | None = Field(description="set for a job's own webhook (POST /v1/jobs)")
    event_types: list[WebhookEventType]
    description: str | None
    enabled: bool
    created_at: datetime
    updated_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="the signing secret; shown only in this response")


class WebhookList(BaseModel):
    items: list[WebhookOut]


class WebhookAttemptOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    number: int
    at: datetime
    status_code: int | None = Field(description="the receiver's HTTP status; null: no answer")
    error: str | None
    duration_ms: float


class WebhookDeliveryOut(BaseModel):
    id: str = Field(description="the webhook-id header (the same on every retry)")
    webhook_id: str
    job_id: str
    event_type: WebhookEventType
    event_id: int = Field(description="the job event it carries")
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    payload: WebhookPayload = Field(description="the body that was (or will be) POSTed")
    attempt_log: list[WebhookAttemptOut]


class WebhookDeliveryList(BaseModel):
    items: list[WebhookDeliveryOut]
