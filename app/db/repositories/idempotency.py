"""Stored first responses of POSTs with an Idempotency-Key."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import IdempotencyKey


def get(session: Session, tenant_id: str, key: str) -> IdempotencyKey | None:
    return session.scalar(select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id,
                                                       IdempotencyKey.key == key))


def add(session: Session, row: IdempotencyKey) -> None:
    session.add(row)
    session.flush()
