"""Thin tasks: take an id, call a service, nothing else (the service re-reads the row)."""

from __future__ import annotations

import os
import socket

from celery.exceptions import SoftTimeLimitExceeded

from app.config import get_settings
from app.db.session import session_scope
from app.services import maintenance
from app.services.pipeline import run_job
from app.services.queue import send_jobs
from workers.celery_app import app


@app.task(name="modelpress.jobs.run", bind=True)
def run(self: object, job_id: str) -> None:
    request_id = getattr(getattr(self, "request", None), "id", None)
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{request_id}"
    run_job(job_id, worker_id, timeout_exceptions=(SoftTimeLimitExceeded,))


@app.task(name="modelpress.maintenance.tick")
def tick() -> dict[str, int]:
    """Reap jobs whose heartbeat stopped and re-send queued jobs the broker lost."""
    settings = get_settings()
    with session_scope(settings) as session:
        reaped = maintenance.reap_expired(session)
        stale = maintenance.reconcile_queued(session, settings)
    # Committed above: only now send.
    sent = send_jobs(app, reaped + stale)
    return {"requeued": len(reaped), "resent": len(stale), "sent": sent}
