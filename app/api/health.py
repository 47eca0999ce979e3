"""Liveness, readiness (database + broker) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.deps import CeleryDep, SessionDep
from app.api.responses import problems
from app.errors import Unavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz", responses=problems(503))
def readyz(session: SessionDep, celery: CeleryDep) -> dict[str, str]:
    """Ready when the database answers and the broker accepts a connection."""
    try:
        session.execute(text("SELECT 1"))
        session.rollback()
    except Exception as e:
        raise Unavailable(f"database unreachable: {type(e).__name__}") from e
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
    except Exception as e:
        raise Unavailable(f"broker unreachable: {type(e).__name__}") from e
    return {"status": "ready", "database": "ok", "broker": "ok"}


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
