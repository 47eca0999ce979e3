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
