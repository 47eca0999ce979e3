"""Administration: tenants and keys (``modelpress admin create-key``, the dev key)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from app.db.repositories import tenants as repo
from app.services.auth import generate_key

DEV_TENANT = "dev"


def create_key(session: Session, tenant_name: str, *, name: str | None = None,
               expires_at: datetime | None = None) -> str:
    """Create ``tenant_name`` if needed and a new key for it. Returns the plaintext key, the
    only time it exists outside the client: only its sha256 is stored."""
    tenant = repo.get_tenant_by_name(session, tenant_name) or repo.create_tenant(session,
                                                                                  tenant_name)
    raw, prefix, key_hash = generate_key()
    repo.add_api_key(session, tenant.id, key_hash, prefix, name=name, expires_at=expires_at)
    return raw


def ensure_dev_key(session: Session) -> str | None:
    """First start of the embedded default: make a ``dev`` tenant with one key and return it.

    Returns None when the dev tenant already has a key (its plaintext is not recoverable).
    """
    tenant = repo.get_tenant_by_name(session, DEV_TENANT)
    if tenant is not None and repo.count_keys(session, tenant.id) > 0:
        return None
    return create_key(session, DEV_TENANT, name="development key")


def revoke_key(session: Session, key_id: str) -> bool:
    from app.db.base import utcnow
    from app.db.models import ApiKey

    key = session.get(ApiKey, key_id)
    if key is None:
        return False
    key.revoked_at = utcnow()
    session.flush()
    return True


UNCHANGED = object()  # set_quotas: leave this quota as it is


def set_quotas(session: Session, tenant_name: str, *,
               max_concurrent_jobs: object = UNCHANGED,  # int | None
               max_stored_bytes: object = UNCHANGED) -> tuple[int | None, int | None]:
    """Set a tenant's own quotas (None = back to the settings default, 0 = unlimited).
    Returns the tenant's (max_concurrent_jobs, max_stored_bytes) after the change."""
    tenant = repo.get_tenant_by_name(session, tenant_name)
    if tenant is None:
        raise LookupError(f"no tenant {tenant_name!r}")
    def pick(given: object, current: int | None, name: str) -> int | None:
        if given is UNCHANGED:
            return current
        if given is not None and (not isinstance(given, int) or given < 0):
            raise ValueError(f"{name} must be a non-negative integer or None")
        return given

    jobs = pick(max_concurrent_jobs, tenant.max_concurrent_jobs, "max_concurrent_jobs")
    stored = pick(max_stored_bytes, tenant.max_stored_bytes, "max_stored_bytes")
    repo.set_quotas(session, tenant.id, jobs, stored)
    return jobs, stored
