from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import ID, Base, utcnow


class JobEvent(Base):
    """One event of a job's stream (GET /v1/jobs/{id}/events), written by whoever changes
    the job row, in the same transaction. ``seq`` is the SSE id: 1, 2, ... per job."""

    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(ID, ForeignKey("jobs.id", ondelete="CASCADE"),
                                        primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    type: Mapped[str] = mapped_column(String(16))  # stage | progress | candidate | outcome
    data: Mapped[dict[str, Any]]  # the SSE data JSON (app.schemas.events.JobEventData)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
