"""What every route declares in the OpenAPI document besides its success: problem+json errors
(with their headers), so the document is the whole contract (checked by schemathesis in
tests/service/test_contract.py)."""

from __future__ import annotations

from typing import Any

from app.api.errors import PROBLEM
from app.schemas.common import Problem

Responses = dict[int | str, dict[str, Any]]

_DESCRIPTIONS = {
    400: "Malformed request (unparsable JSON, NUL byte, body not matching its Content-Length)",
    401: "Missing, unknown, revoked or expired API key, or a key in the query string",
    404: "Unknown id, or another tenant's",
    408: "Upload idle for longer than MODELPRESS_UPLOAD_IDLE_TIMEOUT_S",
    409: "Conflict with the resource's state, or an Idempotency-Key reused",
    413: "Upload past its byte cap or the tenant's stored-bytes quota",
    415: "A form upload (send the raw body)",
    416: "Range outside the artifact",
    422: "Invalid request, file or data",
    429: "Tenant rate limit or concurrent-jobs quota reached",
    503: "Database or broker unreachable",
}
_INT = {"schema": {"type": "integer"}}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}}},
    416: {"Content-Range": {"schema": {"type": "string"}}},
}


def problems(*statuses: int) -> Responses:
    out: Responses = {}
    for s in statuses:
        # Only problem+json (what the handlers send), with the schema: a generated client
        # parses every error into a Problem. The component is added by app/api/openapi.py.
        entry: dict[str, Any] = {"description": _DESCRIPTIONS[s], "content": {
            PROBLEM: {"schema": {"$ref": f"#/components/schemas/{Problem.__name__}"}}}}
        headers = dict(_HEADERS.get(s, {}))
        if s == 429:
            headers["Retry-After"] = {"description": "seconds", **_INT}
        if headers:
            entry["headers"] = headers
        out[s] = entry
    return out


# Every authenticated route: bad request, auth, validation, rate limit.
AUTHED = (400, 401, 422, 429)
READ = problems(*AUTHED, 404)
UPLOAD = problems(*AUTHED, 404, 408, 409, 413, 415)
