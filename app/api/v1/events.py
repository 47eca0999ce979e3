"""A job's event stream (Server-Sent Events) and its webhook deliveries."""

from __future__ import annotations

from typing import Annotated, get_args

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

import app.api.v1.jobs  # noqa: F401  (registers the job_id path convertor)
from app.api.deps import SessionDep, SettingsDep, TenantDep, get_read_engine_for
from app.api.responses import AUTHED, READ, Responses, problems
from app.errors import ValidationFailed
from app.schemas.events import EventType, WebhookDeliveryList
from app.services import events, webhooks
from app.services import jobs as job_service

router = APIRouter(prefix="/v1/jobs", tags=["events"])


STREAM_DOC = (
    "Server-Sent Events, one per line group: `id: <n>` (1, 2, ... per job), `event: <type>` "
    "(`stage`, `progress`, `candidate`, `outcome`), `data: <JSON>` (the schema below). "
    "The stream ends after the `outcome` event (or, idle, after "
    "MODELPRESS_EVENTS_STREAM_MAX_S: resume with Last-Event-ID); `: keep-alive` comments "
    "come every 15 s while nothing happens.")
# Each event's shape as OpenAPI 3.2's itemSchema, and no `schema` (what FastAPI's own SSE
# support emits; schemathesis checks every event against it). Its data: the JobEventData
# component (also used by WebhookPayload).
_ITEM = {"type": "object", "required": ["id", "event", "data"], "properties": {
    "id": {"type": "string", "description": "the event id, an integer"},
    "event": {"type": "string", "enum": list(get_args(EventType))},
    "data": {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"$ref": "#/components/schemas/JobEventData"}}}}
STREAM: Responses = {200: {"description": STREAM_DOC, "content": {"text/event-stream": {
    "itemSchema": _ITEM}}},
    **problems(*AUTHED, 404)}
LastEventId = Annotated[str | None, Header(
    alias="Last-Event-ID",
    description="resume after this event id (sent by SSE clients on reconnect)")]


def _resume_point(last_event_id: str | None, after: int | None) -> int:
    if last_event_id is None or not last_event_id.strip():
        return after or 0
    value = last_event_id.strip()
    if not value.isdigit():
        raise ValidationFailed(f"Last-Event-ID must be a non-negative integer, got {value!r}")
    return int(value)


# response_class without a media type: FastAPI would add a `schema: string` beside itemSchema.
@router.get("/{job_id:job_id}/events", response_class=StreamingResponse, responses=STREAM,
            operation_id="streamJobEvents")
async def stream_job_events(
        job_id: str, request: Request, tenant: TenantDep, session: SessionDep,
        settings: SettingsDep, last_event_id: LastEventId = None,
        after: Annotated[int | None, Query(ge=0, description=(
            "resume after this event id (for clients that cannot set Last-Event-ID; the "
            "header wins when both are sent)"))] = None) -> StreamingResponse:
    """Stage changes, progress (coalesced), each measured candidate and the outcome, as
    Server-Sent Events read from the database: any API process serves any job."""
    start = _resume_point(last_event_id, after)

    def check() -> None:
        try:
            job_service.get_job(session, tenant.tenant_id, job_id)  # another tenant's: 404
        finally:
            session.rollback()  # no connection held for the stream's lifetime

    await run_in_threadpool(check)
    body = events.stream(get_read_engine_for(request), job_id, start,
                         settings.events_poll_interval_s, settings.events_stream_max_s)
    # no-transform / X-Accel-Buffering: proxies must pass each event on as it comes.
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache, no-transform",
                                      "X-Accel-Buffering": "no"})


@router.get("/{job_id:job_id}/webhook-deliveries", response_model=WebhookDeliveryList,
            responses=READ, operation_id="listJobWebhookDeliveries")
def list_job_webhook_deliveries(job_id: str, tenant: TenantDep,
                                session: SessionDep) -> WebhookDeliveryList:
    """Every webhook delivery of this job's events, with each attempt."""
    job = job_service.get_job(session, tenant.tenant_id, job_id)
    return WebhookDeliveryList(items=webhooks.deliveries_for_job(session, tenant.tenant_id,
                                                                 job.id))
