"""Sending job ids to Celery. Call only after the job row is committed."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

RUN_TASK = "modelpress.jobs.run"


def send_jobs(celery_app: Any, items: Iterable[tuple[str, str]]) -> int:
    """Send (job id, queue) pairs; returns how many were sent. A send that fails is logged and
    left to the reconciler (the row stays queued)."""
    sent = 0
    for job_id, queue in items:
        try:
            celery_app.send_task(RUN_TASK, args=[job_id], queue=queue,
                                 retry=True, retry_policy={"max_retries": 2,
                                                           "interval_start": 0.2,
                                                           "interval_step": 0.5})
            sent += 1
        except Exception:
            log.warning("could not send job %s to queue %s; the reconciler will retry",
                        job_id, queue, exc_info=True)
    return sent


def queue_depth(celery_app: Any, queue: str) -> int | None:
    """Messages waiting in ``queue`` on the broker (Redis: the list length; kombu's
    SQLAlchemy transport: its row count), or None when the broker cannot say right now."""
    from kombu.exceptions import ChannelError

    try:
        with celery_app.connection_for_write() as conn:
            ok = conn.default_channel.queue_declare(queue=queue, passive=True)
            return int(ok.message_count)
    except ChannelError:  # kombu's Redis transport: an empty list does not exist, "NOT_FOUND"
        return 0
    except Exception:
        log.warning("could not read the depth of queue %s", queue, exc_info=True)
        return None
