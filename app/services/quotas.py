"""Per-tenant quotas: concurrent jobs (queued + running) and stored upload bytes.

A tenant's row overrides the settings defaults (NULL = default; 0 = unlimited, as in the
settings). The checks that decide take the tenant's row lock (``lock_tenant``), so two
requests racing for the last slot or the last bytes cannot both pass; the lock is held until
the caller's commit, which follows at once.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import Tenant
from app.db.repositories import jobs as job_repo
from app.db.repositories import tenants as repo
from app.errors import QuotaExceeded


def _limit(override: int | None, default: int) -> int | None:
    value = default if override is None else override
    return value if value > 0 else None  # None = unlimited


def job_limit(settings: Settings, tenant: Tenant | None) -> int | None:
    return _limit(tenant.max_concurrent_jobs if tenant else None, settings.max_concurrent_jobs)


def bytes_limit(settings: Settings, tenant: Tenant | None) -> int | None:
    return _limit(tenant.max_stored_bytes if tenant else None, settings.max_stored_bytes)


def reserve_job_slot(session: Session, settings: Settings, tenant_id: str) -> None:
    """Before adding a job: 429 ``quota_exceeded`` when the tenant has its limit of queued +
    running jobs. Locks the tenant's row until the commit."""
    limit = job_limit(settings, repo.get_tenant(session, tenant_id))
    if limit is None:
        return
    repo.lock_tenant(session, tenant_id)
    active = job_repo.count_active(session, tenant_id)
    if active >= limit:
        raise QuotaExceeded(f"this tenant has {active} queued or running jobs, its limit is "
                            f"{limit}; retry when one has finished", status=429,
                            extra={"limit": limit, "used": active})


def upload_allowance(session: Session, settings: Settings, tenant_id: str) -> int | None:
    """Bytes the tenant may still upload (None = unlimited): the streaming cap. Advisory (no
    lock); ``check_stored_bytes`` decides at the end."""
    limit = bytes_limit(settings, repo.get_tenant(session, tenant_id))
    if limit is None:
        return None
    return max(0, limit - repo.stored_bytes(session, tenant_id))


def check_stored_bytes(session: Session, settings: Settings, tenant_id: str) -> None:
    """After the new upload's row is flushed: 413 ``quota_exceeded`` when the tenant's bytes,
    that upload included, pass its quota. Locks the tenant's row until the commit."""
    limit = bytes_limit(settings, repo.get_tenant(session, tenant_id))
    if limit is None:
        return
    repo.lock_tenant(session, tenant_id)
    used = repo.stored_bytes(session, tenant_id)
    if used > limit:
        raise QuotaExceeded(f"this upload would bring the tenant's stored bytes to {used}, "
                            f"past its quota of {limit} bytes", status=413,
                            extra={"limit": limit, "used": used})
