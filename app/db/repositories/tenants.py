"""Tenants and API keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import ApiKey, Tenant


def get_tenant_by_name(session: Session, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


def create_tenant(session: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def add_api_key(session: Session, tenant_id: str, key_hash: str, prefix: str,
                name: str | None = None, expires_at: datetime | None = None) -> ApiKey:
    key = ApiKey(tenant_id=tenant_id, key_hash=key_hash, prefix=prefix, name=name,
                 expires_at=expires_at)
    session.add(key)
    session.flush()
    return key


def get_api_key_by_hash(session: Session, key_hash: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))


def count_keys(session: Session, tenant_id: str) -> int:
    return len(session.scalars(select(ApiKey.id).where(ApiKey.tenant_id == tenant_id)).all())
