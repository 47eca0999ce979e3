"""Thin tasks: take an id, call a service, nothing else (the service re-reads the row)."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_init, worker_ready, worker_shutdown
from sqlalchemy.pool import NullPool

from app.config import get_settings
from app.db.session import make_engine
from app.services import maintenance_loop, webhook_loop
from app.services.pipeline import preload_engine, run_job
from workers.celery_app import app

_maintenance_stop: threading.Event | None = None
_webhooks_stop: threading.Event | None = None


@app.task(name="modelpress.jobs.run", bind=True)
def run(self: Any, job_id: str) -> None:
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"
    run_job(job_id, worker_id, timeout_exceptions=(SoftTimeLimitExceeded,))


@app.task(name="modelpress.maintenance.tick")
def tick() -> dict[str, int]:
    """Reap jobs whose heartbeat stopped and re-send queued jobs the broker lost (for beat)."""
    settings = get_settings()
    engine = make_engine(settings.database_url, poolclass=NullPool)
    try:
        requeued, resent = maintenance_loop.run_once(settings, app, engine)
    finally:
        engine.dispose()
    return {"requeued": requeued, "resent": resent}


@app.task(name="modelpress.webhooks.dispatch")
def dispatch_webhooks() -> dict[str, int]:
    """Send due webhook deliveries (for beat, when webhooks_in_worker is off)."""
    return {"attempts": webhook_loop.run_once(get_settings())}


@worker_init.connect
def _preload_engine(**_: Any) -> None:
    # Main process, before the pool forks: children inherit the imported engine.
    if get_settings().worker_preload_engine:
        preload_engine()


@worker_ready.connect
def _start_maintenance(**_: Any) -> None:
    global _maintenance_stop, _webhooks_stop
    settings = get_settings()
    if settings.reaper_in_worker and _maintenance_stop is None:
        _maintenance_stop = maintenance_loop.start(settings, app)
    if settings.webhooks_in_worker and _webhooks_stop is None:
        _webhooks_stop = webhook_loop.start(settings)


@worker_shutdown.connect
def _stop_maintenance(**_: Any) -> None:
    for stop in (_maintenance_stop, _webhooks_stop):
        if stop is not None:
            stop.set()
