"""Wire contracts (pydantic) shared by the API and the client. No ORM or engine imports."""
from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict


class ErrorCode(StrEnum):
    """Every stable ``code`` of a problem answer or of a failed job's ``error``.

    The server's codes come from ``app/errors.py`` (domain errors), ``app/engine/errors.py``
    (engine errors), ``app/api/errors.py`` (HTTP-level refusals) and the worker's outcomes;
    tests/service/test_openapi.py fails when one of them is missing here. The last three are
    reported by the Python client (``app.client``) for failures that never reached a server
    answer."""

    # 4xx / 5xx answers
    bad_request = "bad_request"
    content_length_mismatch = "content_length_mismatch"
    unauthorized = "unauthorized"
    forbidden = "forbidden"
    not_found = "not_found"
    method_not_allowed = "method_not_allowed"
    not_acceptable = "not_acceptable"
    upload_timeout = "upload_timeout"
    conflict = "conflict"
    payload_too_large = "payload_too_large"
    quota_exceeded = "quota_exceeded"
    unsupported_media_type = "unsupported_media_type"
    range_not_satisfiable = "range_not_satisfiable"
    validation_error = "validation_error"
    rate_limited = "rate_limited"
    too_many_requests = "too_many_requests"
    unavailable = "unavailable"
    internal_error = "internal_error"
    http_error = "http_error"  # an HTTP status without a code of its own
    # engine errors (422 in a request, or a failed job's error)
    invalid_model = "invalid_model"
    unsafe_model = "unsafe_model"
    invalid_data = "invalid_data"
    input_mismatch = "input_mismatch"
    invalid_recipe = "invalid_recipe"
    loader_failed = "loader_failed"
    engine_error = "engine_error"
    constraints_unsatisfiable = "constraints_unsatisfiable"
    # job outcomes
    cancelled = "cancelled"
    timeout = "timeout"
    worker_lost = "worker_lost"
    lease_lost = "lease_lost"
    storage_error = "storage_error"
    # client side (app.client): no answer, a corrupt download, a local file
    unreachable = "unreachable"
    checksum_mismatch = "checksum_mismatch"
    file_error = "file_error"


class FieldError(BaseModel):
    """One invalid part of a request: where (``loc``), what, and pydantic's error type."""

    model_config = ConfigDict(extra="allow")

    loc: list[str]
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, plus a stable machine-readable ``code``."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    code: ErrorCode
    instance: str | None = None
    errors: list[FieldError] | None = None  # validation_error: each invalid field
    details: dict[str, Any] | None = None  # engine errors: the input, layer, key concerned


class TensorSpecOut(BaseModel):
    name: str
    shape: list[int | None]
    dtype: str
