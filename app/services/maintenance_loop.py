"""A background thread that runs the reaper and the reconciler periodically.

Started in a Celery worker's main process (see workers/tasks.py). It uses its own engine with
NullPool: the prefork pool may fork new children from this process at any time, and a child
must never inherit an open database connection.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from app.config import Settings
from app.db.session import make_engine
from app.services import maintenance
from app.services.queue import queue_depth, send_jobs

log = logging.getLogger(__name__)


def run_once(settings: Settings, celery_app: Any, engine: Any) -> tuple[int, int]:
    """One pass: commit the state changes first, then send. Returns (requeued, resent)."""
    with Session(engine) as session:
        reaped = maintenance.reap_expired(session)
        stale = maintenance.reconcile_queued(
            session, settings, queue_depth=lambda q: queue_depth(celery_app, q))
        session.commit()
    send_jobs(celery_app, reaped + stale)
    if reaped or stale:
        log.warning("maintenance: requeued %d job(s) whose worker stopped, re-sent %d",
                    len(reaped), len(stale))
    with Session(engine) as session:
        swept = maintenance.sweep_work_dirs(
            session, Path(settings.tmp_dir or tempfile.gettempdir()))
    if swept:
        log.warning("maintenance: removed %d work directory(ies) of ended jobs", swept)
    return len(reaped), len(stale)


def start(settings: Settings, celery_app: Any) -> threading.Event:
    """Start the loop; set the returned event to stop it."""
    stop = threading.Event()
    engine = make_engine(settings.database_url, poolclass=NullPool)

    def loop() -> None:
        while not stop.wait(settings.reaper_interval_s):
            try:
                run_once(settings, celery_app, engine)
            except Exception:  # keep going: the next pass retries
                log.warning("maintenance pass failed", exc_info=True)
        engine.dispose()

    threading.Thread(target=loop, name="modelpress-maintenance", daemon=True).start()
    return stop
