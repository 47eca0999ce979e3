"""Reaper and reconciler: keep the job table and the broker consistent after crashes.

Both return the (job id, queue) pairs to (re-)send; the caller commits first, then sends.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session

from app.config import Settings
from app.db.base import utcnow
from app.db.models import JobStatus
from app.db.repositories import jobs as repo
from app.services import events


def reap_expired(session: Session, now: datetime | None = None) -> list[tuple[str, str]]:
    """Running jobs whose lease expired (the worker stopped beating): requeue while attempts
    remain, else fail with ``worker_lost``; a job whose cancel was requested becomes cancelled."""
    now = now or utcnow()
    to_send: list[tuple[str, str]] = []
    for job in repo.expired_running(session, now):
        if job.cancel_requested:
            if repo.fail_expired(session, job.id, now, JobStatus.cancelled.value, "cancelled",
                                 "cancelled; the worker stopped before acknowledging it"):
                events.record_job(session, job.id, "outcome")
        elif job.attempt < job.max_attempts:
            if repo.requeue_expired(session, job.id, now):
                repo.mark_enqueued(session, job.id, now)
                events.record_job(session, job.id, "stage")
                to_send.append((job.id, job.queue))
        elif repo.fail_expired(
                session, job.id, now, JobStatus.failed.value, "worker_lost",
                f"worker {job.lease_owner} stopped sending heartbeats (last at "
                f"{job.heartbeat_at}); {job.attempt} of {job.max_attempts} attempts used"):
            events.record_job(session, job.id, "outcome")
    return to_send


def reconcile_queued(session: Session, settings: Settings, now: datetime | None = None,
                     queue_depth: Callable[[str], int | None] | None = None,
                     ) -> list[tuple[str, str]]:
    """Queued jobs whose message is older than ``requeue_after_s``: re-send (claims are
    idempotent, so a duplicate message costs one no-op task).

    ``queue_depth(queue)`` (messages waiting in the broker, None = unknown) tells a lost
    message from one still waiting behind long jobs: when a queue holds at least as many
    messages as it has queued jobs, nothing was lost there and nothing is re-sent. Without it,
    every job waiting longer than ``requeue_after_s`` would get one more message per pass,
    and a long backlog would grow a duplicate per job every ``requeue_after_s``.
    """
    now = now or utcnow()
    stale = repo.stale_queued(session, now - timedelta(seconds=settings.requeue_after_s))
    if queue_depth is not None and stale:
        waiting = repo.queued_counts(session)
        intact = set()
        for queue in {j.queue for j in stale}:
            depth = queue_depth(queue)
            if depth is not None and depth >= waiting.get(queue, 0):
                intact.add(queue)
        stale = [j for j in stale if j.queue not in intact]
    for job in stale:
        repo.mark_enqueued(session, job.id, now)
    return [(j.id, j.queue) for j in stale]


# <tmp>/modelpress-<job id>-<tempfile suffix>: the work directory of one job attempt
# (app/services/pipeline.py). Job ids are 32 hex digits; other "modelpress-*" directories
# (the offline engine's scratch directories) never match.
_WORK_DIR = re.compile(r"modelpress-([0-9a-f]{32})-[^/]+")
TERMINAL = {JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.cancelled.value}


def sweep_work_dirs(session: Session, tmp_root: Path) -> int:
    """Remove this host's work directories of jobs that have ended: a pool child killed
    mid-job leaves its directory behind, and when that was the job's last attempt no later
    claim of the same job removes it. A running job's directory stays (its owner may be
    alive). Returns how many directories were removed."""
    found: dict[str, list[Path]] = {}
    try:
        for d in tmp_root.iterdir():
            m = _WORK_DIR.fullmatch(d.name)
            if m and d.is_dir():
                found.setdefault(m.group(1), []).append(d)
    except FileNotFoundError:
        return 0
    done = [i for i, st in repo.statuses(session, list(found)).items() if st in TERMINAL]
    for job_id in done:
        for d in found[job_id]:
            shutil.rmtree(d, ignore_errors=True)
    return sum(len(found[i]) for i in done)
