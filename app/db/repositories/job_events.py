"""Job events: append (numbered per job) and read after an id."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, literal, select
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Job, JobEvent


def append(session: Session, job_id: str, type_: str, data: dict[str, Any]) -> int:
    """Insert the job's next event; returns its ``seq`` (1, 2, ...).

    Call it in a transaction that has already UPDATEd the job's row: that row lock (Postgres)
    or the write lock (SQLite) is held to the commit, so two writers of one job's events are
    serialised and each sees the other's committed row in ``max(seq)``. Event ids therefore
    commit in order, and a reader resuming after id n never misses an event below n.
    """
    last = select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id).scalar_subquery()
    stmt = (insert(JobEvent)
            .from_select(["job_id", "seq", "type", "data", "created_at"],
                         select(literal(job_id), func.coalesce(last, 0) + 1, literal(type_),
                                literal(data, JobEvent.data.type),
                                literal(utcnow(), JobEvent.created_at.type)))
            .returning(JobEvent.seq))
    seq: int = session.execute(stmt).scalar_one()
    return seq


_AFTER = (select(JobEvent.seq, JobEvent.type, JobEvent.data)
          .where(JobEvent.job_id == bindparam("job_id"), JobEvent.seq > bindparam("after"))
          .order_by(JobEvent.seq).limit(bindparam("limit")))
_STATUS = select(Job.status).where(Job.id == bindparam("job_id"))


def after(conn: Connection, job_id: str, after_seq: int, limit: int = 500,
          ) -> list[tuple[int, str, dict[str, Any]]]:
    """Events of ``job_id`` with ``seq > after_seq``, in order."""
    rows = conn.execute(_AFTER, {"job_id": job_id, "after": after_seq, "limit": limit})
    return [(int(r.seq), r.type, r.data) for r in rows]


def job_status(conn: Connection, job_id: str) -> str | None:
    status: str | None = conn.execute(_STATUS, {"job_id": job_id}).scalar()
    return status
