from __future__ import annotations

import re
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.convertors import StringConvertor, register_url_convertor

from app.api.deps import (
    CeleryDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    bearer_token,
    get_auth_cache,
    get_limiter,
    get_read_engine_for,
    get_read_limiter,
)
from app.api.idempotency import commit_and_remember, replay
from app.api.metrics import JOBS_SUBMITTED
from app.api.responses import AUTHED, READ, Responses, problems
from app.api.v1.models import LOCATION, IdemHeader
from app.db.repositories import artifacts as artifact_repo
from app.db.repositories.pagination import CursorError
from app.errors import Conflict, NotFound, RangeNotSatisfiable, ValidationFailed
from app.schemas.jobs import (
    ArtifactList,
    ArtifactOut,
    JobCreate,
    JobOut,
    JobPage,
    JobReport,
    JobStatusName,
)
from app.services import idempotency as idem
from app.services import jobs as service
from app.services import ratelimit
from app.services.auth import Principal, hash_key
from app.services.idempotency import StoredResponse
from app.services.queue import send_jobs


class JobIdConvertor(StringConvertor):
    """A job id segment: anything but ``/`` and ``:``. Why: ``/v1/jobs/{id}:cancel`` (a custom
    method, AIP-136) must not also be ``GET /v1/jobs/{id}`` with ``id = "x:cancel"``; without
    this, both routes claim that path and the 405 ``Allow`` header lists a GET the document
    does not have. Ids are hex, so no real id is excluded."""

    regex = "[^/:]+"


register_url_convertor("job_id", JobIdConvertor())

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


SUBMIT: Responses = {202: {"description": "Accepted: poll the job", "headers": LOCATION},
                     **problems(*AUTHED, 404, 409)}
STATEFUL = problems(*AUTHED, 404, 409)


@router.post("", status_code=202, response_model=JobOut, responses=SUBMIT)
def create_job(request: Request, body: JobCreate, tenant: TenantDep, session: SessionDep,
               settings: SettingsDep, celery: CeleryDep,
               idempotency_key: IdemHeader = None) -> Response:
    """Submit a compression job: `202` with `Location`; poll the job until it is finished."""
    # Fingerprint the parsed body: whitespace or key order does not make a different request.
    fp = idem.fingerprint("POST", request.url.path, request.url.query,
                          body.model_dump_json().encode())
    if idempotency_key and (stored := idem.find(session, tenant.tenant_id, idempotency_key,
                                                fp)) is not None:
        return replay(stored)
    job = service.create_job(session, settings, tenant.tenant_id, body)
    out = StoredResponse(202, service.to_out(job).model_dump_json(),
                         {"Location": f"/v1/jobs/{job.id}"})
    resp, committed = commit_and_remember(session, tenant.tenant_id, idempotency_key, fp, out)
    if committed:
        # Only after the commit: a rolled-back request must leave no message behind.
        send_jobs(celery, [(job.id, job.queue)])
        JOBS_SUBMITTED.labels(job.queue).inc()
    return Response(resp.body, status_code=resp.status_code, headers=resp.headers,
                    media_type="application/json")


@router.get("", response_model=JobPage, responses=problems(*AUTHED))
def list_jobs(tenant: TenantDep, session: SessionDep, status: JobStatusName | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              cursor: str | None = None) -> JobPage:
    try:
        rows, nxt = service.list_jobs(session, tenant.tenant_id, status, limit, cursor)
    except CursorError as e:
        raise ValidationFailed(str(e)) from e
    return JobPage(items=[service.to_out(j) for j in rows], next_cursor=nxt)


@router.get("/{job_id:job_id}", response_model=JobOut, responses=READ)
async def get_job(job_id: str, request: Request) -> Response:
    """The polled route, kept lean: no Session and no per-request dependencies that hop to
    a thread; one threadpool hop for one SQL statement (auth + job joined when the auth cache
    misses), and the JSON written once by pydantic-core (no response_model re-validation)."""
    key_hash = hash_key(bearer_token(request))
    cache = get_auth_cache(request)
    cached = cache.get(key_hash)
    engine, rate_limiter = get_read_engine_for(request), get_limiter(request)

    def admit(p: Principal) -> None:  # in the read's thread: no extra hop for Redis
        ratelimit.enforce(rate_limiter, p.tenant_id)

    principal, body = await to_thread.run_sync(
        service.read_job_json, engine, key_hash, cached, job_id, admit,
        limiter=get_read_limiter(request))
    if cached is None:
        cache.put(key_hash, principal)
    return Response(body, media_type="application/json")


@router.post("/{job_id:job_id}:cancel", response_model=JobOut, responses=STATEFUL)
def cancel_job(job_id: str, tenant: TenantDep, session: SessionDep) -> JobOut:
    """Queued: cancelled at once. Running: stops at its next progress point."""
    job = service.cancel_job(session, tenant.tenant_id, job_id)
    out = service.to_out(job)
    session.commit()
    return out


@router.get("/{job_id:job_id}/report", response_model=JobReport, responses=STATEFUL)
def get_job_report(job_id: str, tenant: TenantDep, session: SessionDep) -> JobReport:
    """The job's result: baseline, chosen candidate, every candidate, the Pareto front, the
    ratios and the manifest. A failed job has one when its candidates were measured
    (`constraints_unsatisfiable`); 409 when it has none."""
    job = service.get_job(session, tenant.tenant_id, job_id)
    if job.report is None:
        if job.status in ("queued", "running"):
            raise Conflict(f"job {job_id} has no report yet (status {job.status})")
        raise Conflict(f"job {job_id} ended {job.status} "
                       f"({job.error_code or 'no error code'}) without a report")
    return JobReport.model_validate(job.report)


@router.get("/{job_id:job_id}/artifacts", response_model=ArtifactList, responses=READ)
def list_artifacts(job_id: str, tenant: TenantDep, session: SessionDep) -> ArtifactList:
    job = service.get_job(session, tenant.tenant_id, job_id)
    rows = artifact_repo.list_for_job(session, job.id)
    return ArtifactList(items=[ArtifactOut.model_validate(a) for a in rows])


_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range -> [start, end) or None to send everything (RFC 9110 §14.2:
    a syntactically invalid or multi-range header may be ignored)."""
    m = _RANGE.match(header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        return None
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable("empty suffix range", headers={
                "Content-Range": f"bytes */{size}"})
        return max(size - n, 0), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or (last != "" and int(last) < start):
        raise RangeNotSatisfiable(f"range {header!r} outside 0..{size - 1}",
                                  headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


# Every artifact is sent as an octet stream (the artifact list gives each one's own type):
# one binary media type, so a generated client returns the bytes and never parses JSON.
BINARY = "application/octet-stream"
_FILE = {BINARY: {"schema": {"type": "string", "format": "binary"}}}
_STR = {"schema": {"type": "string"}}
_ETAG = {"ETag": {"description": '"<sha256>"', **_STR}}
_SENT = {**_ETAG, "Content-Length": {"description": "bytes", "schema": {"type": "integer"}},
         "Accept-Ranges": {"description": "bytes", **_STR}}
DOWNLOAD_RESPONSES: Responses = {
    200: {"description": "The artifact", "content": _FILE, "headers": _SENT},
    206: {"description": "Partial content (Range)", "content": _FILE,
          "headers": {**_SENT, "Content-Range": _STR}},
    304: {"description": "Not modified (If-None-Match)", "headers": _ETAG},
    **problems(*AUTHED, 404, 416)}
HEAD_RESPONSES: Responses = {
    200: {"description": "The artifact's headers, no body", "headers": _SENT},
    304: {"description": "Not modified (If-None-Match)", "headers": _ETAG},
    **problems(*AUTHED, 404)}

RangeHeader = Annotated[str | None, Header(
    alias="Range", max_length=200, description="`bytes=START-END`, `bytes=START-` or "
                                               "`bytes=-SUFFIX` (one range)")]
IfNoneMatch = Annotated[str | None, Header(
    alias="If-None-Match", max_length=2000, description='`"<sha256>"`: 304 when unchanged')]
IfRange = Annotated[str | None, Header(
    alias="If-Range", max_length=200,
    description='`"<sha256>"`: the Range applies only while the ETag matches')]


def _artifact(session: Any, tenant_id: str, job_id: str, name: str) -> Any:
    job = service.get_job(session, tenant_id, job_id)
    art = artifact_repo.get(session, job.id, name)
    if art is None:
        raise NotFound(f"job {job_id} has no artifact {name!r}")
    return art


def _headers(art: Any, name: str) -> dict[str, str]:
    return {"ETag": f'"{art.sha256}"', "Accept-Ranges": "bytes",
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "private, max-age=0, must-revalidate"}


@router.get("/{job_id:job_id}/artifacts/{name}", responses=DOWNLOAD_RESPONSES,
            response_class=Response)
def download_artifact(job_id: str, name: str, tenant: TenantDep, session: SessionDep,
                      store: StoreDep, range_: RangeHeader = None,
                      if_none_match: IfNoneMatch = None, if_range: IfRange = None) -> Any:
    """Stream an artifact. Strong `ETag` = `"<sha256>"`; `Range` and `If-None-Match` work."""
    art = _artifact(session, tenant.tenant_id, job_id, name)
    headers = _headers(art, name)
    etag = headers["ETag"]
    if if_none_match and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    size = art.size_bytes
    if range_ and (if_range is None or if_range.strip() == etag):
        span = parse_range(range_, size)
        if span is not None:
            start, end = span
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            headers["Content-Length"] = str(end - start)
            return StreamingResponse(store.open(art.storage_key, start, end), status_code=206,
                                     media_type=BINARY, headers=headers)
    headers["Content-Length"] = str(size)
    return StreamingResponse(store.open(art.storage_key), media_type=BINARY, headers=headers)


@router.head("/{job_id:job_id}/artifacts/{name}", responses=HEAD_RESPONSES,
             response_class=Response)
def head_artifact(job_id: str, name: str, tenant: TenantDep, session: SessionDep,
                  if_none_match: IfNoneMatch = None) -> Response:
    """The download's headers (size, `ETag`) without its body (RFC 9110 §9.3.2)."""
    art = _artifact(session, tenant.tenant_id, job_id, name)
    headers = _headers(art, name)
    if if_none_match and _etag_matches(if_none_match, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    headers["Content-Length"] = str(art.size_bytes)
    return Response(status_code=200, headers=headers, media_type=BINARY)
