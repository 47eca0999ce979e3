"""Uploaded data sets."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Dataset
from app.db.repositories.pagination import page


def add(session: Session, dataset: Dataset) -> Dataset:
    session.add(dataset)
    session.flush()
    return dataset


def get(session: Session, tenant_id: str, dataset_id: str) -> Dataset | None:
    return session.scalar(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id))


def get_any(session: Session, dataset_id: str) -> Dataset | None:
    """Unscoped read: for workers, which act on a job id they were handed."""
    return session.get(Dataset, dataset_id)


def list_page(session: Session, tenant_id: str, limit: int,
              cursor: str | None) -> tuple[Sequence[Dataset], str | None]:
    q = select(Dataset).where(Dataset.tenant_id == tenant_id)
    return page(session, q, Dataset.created_at, Dataset.id, limit, cursor)
