from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, utcnow


class JobMetric(Base):
    """One measured point of a job: the baseline, each candidate, the best (kind says which)."""

    __tablename__ = "job_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # baseline | candidate | best | stage
    position: Mapped[int] = mapped_column(default=0)  # candidate index in search order
    name: Mapped[str | None] = mapped_column(String(64))  # stage name for kind=stage
    recipe: Mapped[dict[str, Any] | None]
    metrics: Mapped[dict[str, Any]]
    feasible: Mapped[bool | None]
    distilled: Mapped[bool | None]
    reasons: Mapped[list[Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
