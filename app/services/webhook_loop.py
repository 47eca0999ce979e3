"""A background thread that sends due webhook deliveries, so no job's worker ever waits on
a receiver.

Started in a Celery worker's main process (workers/tasks.py), beside the maintenance loop;
like it, it has its own NullPool engine (the prefork pool may fork children from this process
at any time, and a child must never inherit an open connection). Several workers running it
is safe: each delivery is claimed with a lease before it is sent.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

from app.config import Settings
from app.db.session import make_engine
from app.services import webhooks

log = logging.getLogger(__name__)


def run_once(settings: Settings) -> int:
    """One pass on a throwaway engine (the Celery task's entry point)."""
    engine = make_engine(settings.database_url, poolclass=NullPool)
    try:
        return webhooks.dispatch_once(sessionmaker(engine, expire_on_commit=False), settings)
    finally:
        engine.dispose()


def start(settings: Settings) -> threading.Event:
    """Start the loop; set the returned event to stop it."""
    stop = threading.Event()
    engine = make_engine(settings.database_url, poolclass=NullPool)
    sessions = sessionmaker(engine, expire_on_commit=False)

    def loop() -> None:
        while not stop.wait(settings.webhook_poll_interval_s):
            try:
                webhooks.dispatch_once(sessions, settings)
            except Exception:  # keep going: the next pass retries
                log.warning("webhook dispatch pass failed", exc_info=True)
        engine.dispose()

    threading.Thread(target=loop, name="modelpress-webhooks", daemon=True).start()
    return stop
