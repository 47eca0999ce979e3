"""Domain errors with stable codes. One handler (app/api/errors.py) renders them as RFC 9457.

Engine errors (``app.engine.errors.EngineError``) keep their own ``code``; ``ENGINE_STATUS``
says which HTTP status each one gets when it surfaces in a request.
"""

from __future__ import annotations

from typing import Any


class AppError(Exception):
    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(self, detail: str, *, extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra or {}
        self.headers = headers or {}


class NotFound(AppError):
    status, code, title = 404, "not_found", "Not found"


class Unauthorized(AppError):
    status, code, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.headers.setdefault("WWW-Authenticate", 'Bearer realm="modelpress"')


class PayloadTooLarge(AppError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class UnsupportedMediaType(AppError):
    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class Conflict(AppError):
    status, code, title = 409, "conflict", "Conflict"


class Unavailable(AppError):
    status, code, title = 503, "unavailable", "Service unavailable"


class ValidationFailed(AppError):
    status, code, title = 422, "validation_error", "Validation error"


class RangeNotSatisfiable(AppError):
    status, code, title = 416, "range_not_satisfiable", "Range not satisfiable"


class RequestTimeout(AppError):
    """An upload that stopped sending for longer than ``upload_idle_timeout_s``."""

    status, code, title = 408, "upload_timeout", "Request timeout"


class ContentLengthMismatch(AppError):
    """A body longer or shorter than its ``Content-Length`` (truncated or smuggled bytes)."""

    status, code, title = 400, "content_length_mismatch", "Bad request"


class RateLimited(AppError):
    status, code, title = 429, "rate_limited", "Too many requests"

    def __init__(self, detail: str, retry_after_s: int, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.headers["Retry-After"] = str(retry_after_s)


class QuotaExceeded(AppError):
    """A tenant quota: 429 for concurrent jobs (retry when one finishes), 413 for bytes."""

    code, title = "quota_exceeded", "Quota exceeded"

    def __init__(self, detail: str, *, status: int, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.status = status


class WorkerLost(AppError):
    """Used for jobs whose heartbeat stopped after the last attempt."""

    status, code, title = 500, "worker_lost", "Worker lost"


# HTTP status of engine error codes raised while handling a request (uploads, validation).
ENGINE_STATUS: dict[str, int] = {
    "invalid_model": 422,
    "unsafe_model": 422,
    "invalid_data": 422,
    "input_mismatch": 422,
    "invalid_recipe": 422,
    "loader_failed": 422,
    "constraints_unsatisfiable": 422,
    "cancelled": 409,
    "timeout": 504,
}
