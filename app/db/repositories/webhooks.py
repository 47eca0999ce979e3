"""Webhook endpoints, their deliveries (an outbox) and the attempts log."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from app.db.models import Webhook, WebhookAttempt, WebhookDelivery

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def add(session: Session, hook: Webhook) -> Webhook:
    session.add(hook)
    session.flush()
    return hook


def get(session: Session, tenant_id: str, webhook_id: str) -> Webhook | None:
    return session.scalar(select(Webhook).where(Webhook.id == webhook_id,
                                                Webhook.tenant_id == tenant_id))


def list_for_tenant(session: Session, tenant_id: str) -> Sequence[Webhook]:
    return session.scalars(select(Webhook).where(Webhook.tenant_id == tenant_id)
                           .order_by(Webhook.created_at, Webhook.id)).all()


def remove(session: Session, hook: Webhook) -> None:
    session.execute(delete(Webhook).where(Webhook.id == hook.id))


def subscribers(session: Session, tenant_id: str, job_id: str) -> Sequence[Webhook]:
    """Enabled endpoints for a job's events: the tenant's and the job's own."""
    return session.scalars(select(Webhook).where(
        Webhook.tenant_id == tenant_id, Webhook.enabled.is_(True),
        or_(Webhook.job_id.is_(None), Webhook.job_id == job_id))).all()


def add_delivery(session: Session, delivery: WebhookDelivery) -> None:
    session.add(delivery)


def due(session: Session, now: datetime, limit: int) -> Sequence[str]:
    """Ids of pending deliveries whose next attempt is due and that nobody is sending."""
    return session.scalars(
        select(WebhookDelivery.id).where(
            WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now))
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)).all()


def claim(session: Session, delivery_id: str, now: datetime, lease_s: float,
          ) -> WebhookDelivery | None:
    """Take a due delivery for ``lease_s`` seconds (one UPDATE: two dispatchers never both
    send it). Returns the row, or None when another dispatcher got it first."""
    row = session.execute(
        update(WebhookDelivery).where(
            WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING,
            or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now))
        .values(lease_until=now + timedelta(seconds=lease_s))
        .returning(WebhookDelivery.id)).first()
    if row is None:
        return None
    return session.get(WebhookDelivery, delivery_id, populate_existing=True)


def record_attempt(session: Session, delivery: WebhookDelivery, attempt: WebhookAttempt,
                   **fields: Any) -> None:
    session.add(attempt)
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery.id)
                    .values(lease_until=None, **fields))


def deliveries_for_job(session: Session, tenant_id: str, job_id: str,
                       ) -> Sequence[WebhookDelivery]:
    return session.scalars(select(WebhookDelivery).where(
        WebhookDelivery.tenant_id == tenant_id, WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.id)).all()


def deliveries_for_webhook(session: Session, webhook_id: str, limit: int,
                           ) -> Sequence[WebhookDelivery]:
    """The endpoint's latest deliveries, newest first."""
    return session.scalars(select(WebhookDelivery).where(
        WebhookDelivery.webhook_id == webhook_id)
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id).limit(limit)).all()


def attempts_of(session: Session, delivery_ids: Sequence[str],
                ) -> dict[str, list[WebhookAttempt]]:
    out: dict[str, list[WebhookAttempt]] = {i: [] for i in delivery_ids}
    if delivery_ids:
        for a in session.scalars(select(WebhookAttempt).where(
                WebhookAttempt.delivery_id.in_(list(delivery_ids)))
                .order_by(WebhookAttempt.delivery_id, WebhookAttempt.number)):
            out[a.delivery_id].append(a)
    return out
