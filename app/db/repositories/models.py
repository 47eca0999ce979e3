"""Uploaded models."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Model
from app.db.repositories.pagination import page


def add(session: Session, model: Model) -> Model:
    session.add(model)
    session.flush()
    return model


def get(session: Session, tenant_id: str, model_id: str) -> Model | None:
    return session.scalar(select(Model).where(Model.id == model_id, Model.tenant_id == tenant_id))


def get_any(session: Session, model_id: str) -> Model | None:
    """Unscoped read: for workers, which act on a job id they were handed."""
    return session.get(Model, model_id)


def list_page(session: Session, tenant_id: str, limit: int,
              cursor: str | None) -> tuple[Sequence[Model], str | None]:
    q = select(Model).where(Model.tenant_id == tenant_id)
    return page(session, q, Model.created_at, Model.id, limit, cursor)
