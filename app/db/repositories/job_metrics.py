"""Per-stage and per-candidate measurements of a job."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db.models import JobMetric


def replace_for_job(session: Session, job_id: str, rows: Iterable[JobMetric]) -> None:
    session.execute(delete(JobMetric).where(JobMetric.job_id == job_id))
    session.add_all(list(rows))
    session.flush()


def list_for_job(session: Session, job_id: str) -> Sequence[JobMetric]:
    return session.scalars(select(JobMetric).where(JobMetric.job_id == job_id)
                           .order_by(JobMetric.id)).all()
