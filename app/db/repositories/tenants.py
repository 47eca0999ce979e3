"""Tenants and API keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db.models import ApiKey, Dataset, Model, Tenant


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


def get_tenant(session: Session, tenant_id: str) -> Tenant | None:
    return session.get(Tenant, tenant_id)


def lock_tenant(session: Session, tenant_id: str) -> Tenant | None:
    """The tenant's row, locked until the transaction ends (``SELECT ... FOR NO KEY UPDATE``).

    Serialises a tenant's quota checks: two requests racing for the last slot take the lock in
    turn, and the second one's count (a new statement, READ COMMITTED) sees the first one's
    committed row. NO KEY UPDATE, not UPDATE: an upload checks after inserting its row, whose
    foreign key already holds a KEY SHARE lock on the tenant; two such uploads each asking
    FOR UPDATE deadlocked (seen in CI), while NO KEY UPDATE does not conflict with KEY SHARE.
    SQLite has no row locks; its single writer gives the same order (a stale writer fails
    instead of passing).
    """
    return session.scalar(select(Tenant).where(Tenant.id == tenant_id)
                          .with_for_update(key_share=True)
                          .execution_options(populate_existing=True))


def set_quotas(session: Session, tenant_id: str, max_concurrent_jobs: int | None,
               max_stored_bytes: int | None) -> None:
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(
        max_concurrent_jobs=max_concurrent_jobs, max_stored_bytes=max_stored_bytes))


def stored_bytes(session: Session, tenant_id: str) -> int:
    """Bytes of the tenant's uploaded models and data sets (rows flushed in this
    transaction included)."""
    models = select(func.coalesce(func.sum(Model.size_bytes), 0)).where(
        Model.tenant_id == tenant_id).scalar_subquery()
    datasets = select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(
        Dataset.tenant_id == tenant_id).scalar_subquery()
    return int(session.scalar(select(models + datasets)) or 0)
