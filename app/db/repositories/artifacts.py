"""Job artifacts (rows exist only for fully written bytes)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db.models import Artifact


def add(session: Session, artifact: Artifact) -> Artifact:
    # A retried attempt replaces the artifact of the same name.
    session.execute(delete(Artifact).where(Artifact.job_id == artifact.job_id,
                                           Artifact.name == artifact.name))
    session.add(artifact)
    session.flush()
    return artifact


def list_for_job(session: Session, job_id: str) -> Sequence[Artifact]:
    return session.scalars(select(Artifact).where(Artifact.job_id == job_id)
                           .order_by(Artifact.name)).all()


def get(session: Session, job_id: str, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_id == job_id,
                                                 Artifact.name == name))


def delete_for_job(session: Session, job_id: str) -> int:
    """Rows of a job's unfinished earlier attempt (a new attempt is about to run)."""
    return len(session.execute(delete(Artifact).where(Artifact.job_id == job_id)
                               .returning(Artifact.id)).all())
