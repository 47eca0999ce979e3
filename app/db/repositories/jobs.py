"""Jobs: creation, reads, the lease (claim / heartbeat / finish), reaper and reconciler queries.

The lease statements are single ``UPDATE ... WHERE ... RETURNING`` so two workers can never both
claim a job: the row lock (Postgres) or the write lock (SQLite) serialises them and only one
sees the WHERE clause still true. RETURNING needs Postgres or SQLite >= 3.35.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, RowMapping, and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ApiKey, Job, JobStatus
from app.db.repositories.pagination import page

QUEUED, RUNNING = JobStatus.queued.value, JobStatus.running.value
SUCCEEDED, FAILED, CANCELLED = (JobStatus.succeeded.value, JobStatus.failed.value,
                                JobStatus.cancelled.value)


def add(session: Session, job: Job) -> Job:
    session.add(job)
    session.flush()
    return job


def get(session: Session, tenant_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


# What GET /v1/jobs/{id} shows: never ``report`` (large; it has its own route).
OUT_COLUMNS = (Job.id, Job.status, Job.stage, Job.progress, Job.eta_s, Job.activity,
               Job.message, Job.attempt, Job.max_attempts, Job.model_id, Job.dataset_id,
               Job.eval_dataset_id, Job.device,
               Job.queue, Job.constraints, Job.recipe, Job.metrics, Job.error_code,
               Job.error_detail, Job.cancel_requested, Job.created_at, Job.started_at,
               Job.finished_at, Job.updated_at)


# Built once with bind parameters: per call, SQLAlchemy reuses the statement's memoized cache
# key and compiled form instead of rebuilding the expression (measured on this path).
_OUT_BY_TENANT = select(*OUT_COLUMNS).where(Job.id == bindparam("job_id"),
                                            Job.tenant_id == bindparam("tenant_id"))
_OUT_BY_KEY = (
    select(ApiKey.tenant_id.label("key_tenant_id"), ApiKey.id.label("key_id"),
           ApiKey.revoked_at.label("key_revoked_at"),
           ApiKey.expires_at.label("key_expires_at"), *OUT_COLUMNS)
    .select_from(ApiKey)
    .outerjoin(Job, and_(Job.tenant_id == ApiKey.tenant_id, Job.id == bindparam("job_id")))
    .where(ApiKey.key_hash == bindparam("key_hash")))


def get_out_row(conn: Connection, tenant_id: str, job_id: str) -> RowMapping | None:
    """The job's public columns (Core, no ORM identity map: this is the polled hot path)."""
    return conn.execute(_OUT_BY_TENANT, {"job_id": job_id, "tenant_id": tenant_id},
                        ).mappings().first()


def get_out_row_by_key(conn: Connection, key_hash: str, job_id: str) -> RowMapping | None:
    """The API key (``key_tenant_id``, ``key_id``, ``key_revoked_at``, ``key_expires_at``)
    and, when that key's tenant owns it, the job's public columns (NULL otherwise): the auth
    lookup and the read in one round trip. None = no such key."""
    return conn.execute(_OUT_BY_KEY, {"job_id": job_id, "key_hash": key_hash},
                        ).mappings().first()


def count_active(session: Session, tenant_id: str) -> int:
    """The tenant's queued + running jobs (what the concurrent-jobs quota counts)."""
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.in_((QUEUED, RUNNING)))) or 0


def get_any(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def list_page(session: Session, tenant_id: str, status: str | None, limit: int,
              cursor: str | None) -> tuple[Sequence[Job], str | None]:
    q = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        q = q.where(Job.status == status)
    return page(session, q, Job.created_at, Job.id, limit, cursor)


def cancel_if_queued(session: Session, job_id: str) -> bool:
    """queued -> cancelled at once (a worker that later receives the message will not claim it)."""
    now = utcnow()
    row = session.execute(
        update(Job).where(Job.id == job_id, Job.status == QUEUED)
        .values(status=CANCELLED, cancel_requested=True, finished_at=now, updated_at=now,
                error_code="cancelled", error_detail="cancelled before it started")
        .returning(Job.id)).first()
    return row is not None


def request_cancel(session: Session, job_id: str) -> bool:
    """running -> cancel_requested; the worker's progress callback stops the run."""
    row = session.execute(
        update(Job).where(Job.id == job_id, Job.status == RUNNING)
        .values(cancel_requested=True, updated_at=utcnow()).returning(Job.id)).first()
    return row is not None


def mark_enqueued(session: Session, job_id: str, at: datetime | None = None) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=at or utcnow()))


def claim(session: Session, job_id: str, worker_id: str, lease_s: float,
          dead_owner: str | None = None) -> Job | None:
    """Take the lease of a queued job, or of a running job whose lease expired, or (when
    ``dead_owner`` is given: a holder the caller has proven dead) of a running job whose lease
    that holder still has.

    Counts the attempt. Returns the claimed row, or None when someone else holds it, it is
    finished, cancelled, or out of attempts.
    """
    now = utcnow()
    running_free = Job.lease_expires_at < now
    if dead_owner is not None:
        running_free = or_(running_free, Job.lease_owner == dead_owner)
    claimable = or_(
        Job.status == QUEUED,
        and_(Job.status == RUNNING, running_free),
    )
    stmt = (
        update(Job)
        .where(Job.id == job_id, claimable, Job.cancel_requested.is_(False),
               Job.attempt < Job.max_attempts)
        .values(status=RUNNING, attempt=Job.attempt + 1, lease_owner=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_s), heartbeat_at=now,
                started_at=now, updated_at=now, stage="load", progress=0.0, eta_s=None,
                activity=None, error_code=None, error_detail=None)
        .returning(Job.id)
    )
    if session.execute(stmt).first() is None:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    return job


def lease_owner(session: Session, job_id: str) -> str | None:
    """Holder of a running job's lease (None when the job is not running)."""
    return session.scalar(select(Job.lease_owner).where(Job.id == job_id,
                                                        Job.status == RUNNING))


def heartbeat(session: Session, job_id: str, worker_id: str, lease_s: float,
              **progress: Any) -> bool | None:
    """Extend the lease (and write progress fields).

    Returns ``cancel_requested``, or None when the lease is no longer ours (reaped and
    re-claimed by another worker, or finished).
    """
    now = utcnow()
    row = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == worker_id, Job.status == RUNNING)
        .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=lease_s),
                updated_at=now, **progress)
        .returning(Job.cancel_requested)).first()
    return None if row is None else bool(row[0])


def finish(session: Session, job_id: str, worker_id: str, status: str, **fields: Any) -> bool:
    """Write the outcome if we still hold the lease (a finished job has no ETA, no activity)."""
    now = utcnow()
    row = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == worker_id, Job.status == RUNNING)
        .values(status=status, finished_at=now, updated_at=now, lease_owner=None,
                lease_expires_at=None, eta_s=None, activity=None, **fields)
        .returning(Job.id)).first()
    return row is not None


def expired_running(session: Session, now: datetime, limit: int = 100) -> Sequence[Job]:
    return session.scalars(
        select(Job).where(Job.status == RUNNING, Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at).limit(limit)).all()


def requeue_expired(session: Session, job_id: str, now: datetime) -> bool:
    """running with an expired lease -> queued (another attempt)."""
    row = session.execute(
        update(Job).where(Job.id == job_id, Job.status == RUNNING, Job.lease_expires_at < now)
        .values(status=QUEUED, lease_owner=None, lease_expires_at=None, stage=None,
                progress=0.0, eta_s=None, activity=None, updated_at=now,
                message="requeued: worker heartbeat stopped")
        .returning(Job.id)).first()
    return row is not None


def fail_expired(session: Session, job_id: str, now: datetime, status: str, code: str,
                 detail: str) -> bool:
    row = session.execute(
        update(Job).where(Job.id == job_id, Job.status == RUNNING, Job.lease_expires_at < now)
        .values(status=status, lease_owner=None, lease_expires_at=None, finished_at=now,
                updated_at=now, eta_s=None, activity=None, error_code=code,
                error_detail=detail)
        .returning(Job.id)).first()
    return row is not None


def stale_queued(session: Session, enqueued_before: datetime, limit: int = 100) -> Sequence[Job]:
    """Queued jobs whose message was sent long ago (or never): the broker may have lost it."""
    return session.scalars(
        select(Job).where(Job.status == QUEUED,
                          or_(Job.enqueued_at.is_(None), Job.enqueued_at < enqueued_before))
        .order_by(Job.created_at).limit(limit)).all()


def queued_counts(session: Session) -> dict[str, int]:
    """Number of queued jobs per broker queue."""
    rows = session.execute(select(Job.queue, func.count()).where(Job.status == QUEUED)
                           .group_by(Job.queue)).all()
    return {queue: int(n) for queue, n in rows}


def statuses(session: Session, job_ids: Sequence[str]) -> dict[str, str]:
    """Status of each existing job among ``job_ids`` (missing ids are left out)."""
    if not job_ids:
        return {}
    return {i: st for i, st in session.execute(
        select(Job.id, Job.status).where(Job.id.in_(list(job_ids))))}
