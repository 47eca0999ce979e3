"""One RFC 9457 renderer for every error: domain, engine, validation, routing, unexpected."""

from __future__ import annotations

import logging
import sqlite3
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.engine.errors import EngineError
from app.errors import ENGINE_STATUS, AppError

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
TYPE_BASE = "https://modelpress.dev/problems/"

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 408: "upload_timeout",
                 409: "conflict",
                 413: "payload_too_large", 415: "unsupported_media_type",
                 416: "range_not_satisfiable", 422: "validation_error",
                 429: "too_many_requests", 503: "unavailable"}


def problem(status: int, code: str, detail: str | None, *, instance: str | None = None,
            headers: dict[str, str] | None = None,
            extra: dict[str, Any] | None = None) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_BASE + code,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    body.update({k: v for k, v in (extra or {}).items() if k not in body})
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


# Seconds a client should wait before retrying while the database is unreachable: about the
# time a Postgres restart or failover takes.
DB_RETRY_AFTER_S = 5


def database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means "the database cannot be reached now" (down, restarting, the
    connection dropped, the pool exhausted): transient, so 503 and not 500. OperationalError
    covers refused connections, "terminating connection due to administrator command" and
    "the database system is starting up"; a dropped connection is flagged invalidated."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError) and isinstance(exc.orig, sqlite3.OperationalError):
        # SQLite reports schema mistakes ("no such table") as OperationalError too: those are
        # bugs (500); only a busy or unreadable file is transient.
        return any(m in str(exc.orig) for m in ("locked", "unable to open", "disk I/O"))
    return isinstance(exc, OperationalError | InterfaceError | PoolTimeout)


def _clean_errors(errors: Any) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        out.append({"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")),
                    "type": str(e.get("type", ""))})
    return out


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed(request: Request) -> list[str]:
    """The methods some route serves on this path (asked of the router itself, so included
    routers and mounts answer too)."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def install(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        return problem(exc.status, exc.code, exc.detail, instance=request.url.path,
                       headers=exc.headers or None, extra=exc.extra)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        status = ENGINE_STATUS.get(exc.code, 500)
        details = {str(k): (v if isinstance(v, str | int | float | bool | None) else str(v))
                   for k, v in exc.details.items()}
        return problem(status, exc.code, exc.message, instance=request.url.path,
                       extra={"details": details} if details else None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _clean_errors(exc.errors())
        bad_json = next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)
        if bad_json is not None:
            # Not JSON at all: a malformed request (400 bad_request), not an invalid one (422).
            why = (bad_json.get("ctx") or {}).get("error", "JSON decode error")
            return problem(400, "bad_request", f"the body is not valid JSON: {why} (at "
                           f"character {bad_json['loc'][-1]})", instance=request.url.path)
        detail = "; ".join(f"{'.'.join(e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                           for e in errors[:5]) if errors else "invalid request"
        return problem(422, "validation_error", detail, instance=request.url.path,
                       extra={"errors": errors})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette names only the first route of the path that matched; a path served by
            # several routes (GET and POST /v1/models) must list all of them (RFC 9110 §15.5.6).
            headers = {**(headers or {}), "Allow": ", ".join(_allowed(request))}
        return problem(exc.status_code, code, str(exc.detail), instance=request.url.path,
                       headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal_error", "internal error", instance=request.url.path)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if database_unavailable(exc):
            log.warning("database unavailable on %s %s: %s", request.method,
                        request.url.path, type(exc.__cause__ or exc).__name__)
            return problem(503, "unavailable", "the database is unreachable; retry later",
                           instance=request.url.path,
                           headers={"Retry-After": str(DB_RETRY_AFTER_S)})
        return await _unexpected(request, exc)
