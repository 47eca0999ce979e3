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
