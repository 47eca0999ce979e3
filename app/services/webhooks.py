"""Webhooks: endpoints (per tenant or per job), an outbox of deliveries written in the same
transaction as the job event they carry, and a dispatcher that sends them.

Signing follows the Standard Webhooks spec (standardwebhooks.com): headers ``webhook-id``
(the delivery id, the same on every retry), ``webhook-timestamp`` (Unix seconds of this
attempt) and ``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` with
the key ``base64decode(secret without "whsec_")``.

SSRF: the dispatcher resolves the URL's host itself, refuses any address that is not global
(loopback, RFC 1918, link-local incl. cloud metadata 169.254.169.254, ...) unless
``webhook_allow_private``, connects to the address it checked (no second lookup a DNS
rebinding could answer differently), and never follows redirects.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.base import utcnow
from app.db.models import Job, Webhook, WebhookAttempt, WebhookDelivery
from app.db.repositories import webhooks as repo
from app.errors import NotFound, ValidationFailed
from app.schemas.events import (
    TERMINAL_WEBHOOK_EVENTS,
    WebhookAttemptOut,
    WebhookCreate,
    WebhookDeliveryOut,
    WebhookPayload,
    WebhookUpdate,
)

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
USER_AGENT = "ModelPress-Webhooks/1"
DISPATCH_BATCH = 20  # deliveries per pass; the next pass (webhook_poll_interval_s) goes on


# --- secrets and signatures --------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)


def check_secret(secret: str) -> str:
    """A client-chosen secret must be whsec_ + base64 of 24-64 bytes (192-512 bits)."""
    try:
        ok = secret.startswith(SECRET_PREFIX) and 24 <= len(_key(secret)) <= 64
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        raise ValidationFailed("a webhook secret is 'whsec_' + base64 of 24 to 64 random bytes")
    return secret


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` header value."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


# --- URL policy ---------------------------------------------------------------------------


class UnsafeAddress(Exception):
    """The URL's host is (or resolves to) an address webhooks may not reach."""


def check_url(url: str) -> str:
    """Syntax at creation: absolute http(s), a host, no credentials in it (they would land in
    logs and delivery rows; put them in the secret's place: the signature authenticates us)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValidationFailed(f"webhook URL {url!r} is not a valid URL: {e}") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationFailed(f"webhook URL {url!r} must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValidationFailed("webhook URL must not contain credentials")
    if port == 0:
        raise ValidationFailed("webhook URL port 0 is not valid")
    return url


def _allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return allow_private or (ip.is_global and not ip.is_multicast)


def resolve(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to: every address the host resolves to must be allowed (one
    private answer among public ones is refused too)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UnsafeAddress(f"cannot resolve {host!r}: {e}") from e
    addrs = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    bad = [str(a) for a in addrs if not _allowed(a, allow_private)]
    if bad or not addrs:
        raise UnsafeAddress(f"{host!r} resolves to a non-public address ({', '.join(bad)}); "
                            "set MODELPRESS_WEBHOOK_ALLOW_PRIVATE=true to allow it")
    return str(addrs[0])


# --- endpoints ------------------------------------------------------------------------------


def create(session: Session, tenant_id: str, body: WebhookCreate,
           job_id: str | None = None) -> Webhook:
    secret = new_secret() if body.secret is None else check_secret(body.secret)
    return repo.add(session, Webhook(
        tenant_id=tenant_id, job_id=job_id, url=check_url(body.url), secret=secret,
        event_types=list(dict.fromkeys(body.event_types)), description=body.description,
        enabled=True))


def create_for_job(session: Session, tenant_id: str, job_id: str, url: str,
                   secret: str) -> Webhook:
    """POST /v1/jobs with ``webhook_url``: a webhook of that job only, for its outcome."""
    return create(session, tenant_id, WebhookCreate(url=url, secret=secret, description=None,
                                                    event_types=TERMINAL_WEBHOOK_EVENTS),
                  job_id=job_id)


def get(session: Session, tenant_id: str, webhook_id: str) -> Webhook:
    hook = repo.get(session, tenant_id, webhook_id)
    if hook is None:
        raise NotFound(f"webhook {webhook_id} not found")
    return hook


def list_for_tenant(session: Session, tenant_id: str) -> Sequence[Webhook]:
    return repo.list_for_tenant(session, tenant_id)


def update(session: Session, tenant_id: str, webhook_id: str, body: WebhookUpdate) -> Webhook:
    hook = get(session, tenant_id, webhook_id)
    if body.url is not None:
        hook.url = check_url(body.url)
    if body.event_types is not None:
        hook.event_types = list(dict.fromkeys(body.event_types))
    if "description" in body.model_fields_set:
        hook.description = body.description
    if body.enabled is not None:
        hook.enabled = body.enabled
    hook.updated_at = utcnow()
    session.flush()
    return hook


def delete(session: Session, tenant_id: str, webhook_id: str) -> None:
    repo.remove(session, get(session, tenant_id, webhook_id))


# --- the outbox -------------------------------------------------------------------------------


def webhook_type(event_type: str, status: str) -> str | None:
    """The webhook event type of a job event (progress and candidates are stream-only)."""
    if event_type == "stage":
        return "job.stage"
    if event_type == "outcome":
        return f"job.{status}"
    return None


def enqueue(session: Session, job_id: str, event: dict[str, Any]) -> int:
    """One delivery per subscribed endpoint for ``event`` (the stream's data JSON, with id
    and type), in the caller's transaction. Returns how many were queued."""
    kind = webhook_type(event["type"], event["status"])
    if kind is None:
        return 0
    tenant_id = session.get_one(Job, job_id).tenant_id
    now = utcnow()
    n = 0
    for hook in repo.subscribers(session, tenant_id, job_id):
        if kind not in hook.event_types:
            continue
        body = json.dumps({"type": kind, "timestamp": event["at"], "data": event},
                          separators=(",", ":"))
        repo.add_delivery(session, WebhookDelivery(
            id=f"msg_{uuid.uuid4().hex}", webhook_id=hook.id, tenant_id=tenant_id,
            job_id=job_id, event_type=kind, event_seq=event["id"], body=body,
            status=repo.PENDING, attempts=0, next_attempt_at=now))
        n += 1
    return n


# --- the log ---------------------------------------------------------------------------------


def _delivery_out(d: WebhookDelivery, attempts: list[WebhookAttempt]) -> WebhookDeliveryOut:
    return WebhookDeliveryOut(
        id=d.id, webhook_id=d.webhook_id, job_id=d.job_id,
        event_type=d.event_type,  # type: ignore[arg-type]
        event_id=d.event_seq, status=d.status,  # type: ignore[arg-type]
        attempts=d.attempts, next_attempt_at=d.next_attempt_at,
        last_status_code=d.last_status_code, last_error=d.last_error,
        created_at=d.created_at, delivered_at=d.delivered_at,
        payload=WebhookPayload.model_validate_json(d.body),
        attempt_log=[WebhookAttemptOut.model_validate(a) for a in attempts])


def _with_attempts(session: Session, rows: Sequence[WebhookDelivery],
                   ) -> list[WebhookDeliveryOut]:
    log_ = repo.attempts_of(session, [d.id for d in rows])
    return [_delivery_out(d, log_[d.id]) for d in rows]


def deliveries_for_job(session: Session, tenant_id: str, job_id: str,
                       ) -> list[WebhookDeliveryOut]:
    return _with_attempts(session, repo.deliveries_for_job(session, tenant_id, job_id))


def deliveries_for_webhook(session: Session, tenant_id: str, webhook_id: str, limit: int,
                           ) -> list[WebhookDeliveryOut]:
    hook = get(session, tenant_id, webhook_id)
    return _with_attempts(session, repo.deliveries_for_webhook(session, hook.id, limit))


# --- sending ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptResult:
    status_code: int | None
    error: str | None
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def post(client: httpx.Client, settings: Settings, url: str, secret: str, msg_id: str,
         body: str) -> AttemptResult:
    """One signed POST to the address ``resolve`` approved; never raises."""
    t0 = time.monotonic()
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        ip = resolve(host, port, settings.webhook_allow_private)
        ip_host = f"[{ip}]" if ":" in ip else ip
        pinned = parts._replace(netloc=f"{ip_host}:{port}").geturl()
        ts = int(time.time())
        headers = {"content-type": "application/json", "user-agent": USER_AGENT,
                   "host": parts.netloc, "webhook-id": msg_id, "webhook-timestamp": str(ts),
                   "webhook-signature": sign(secret, msg_id, ts, body)}
        # sni_hostname: TLS checks the certificate against the URL's name, not the address.
        ext = {"sni_hostname": host} if parts.scheme == "https" else {}
        with client.stream("POST", pinned, content=body.encode(), headers=headers,
                           extensions=ext) as r:  # the receiver's body is never read
            code = r.status_code
        err = None if 200 <= code < 300 else f"HTTP {code}"
        return AttemptResult(code, err, (time.monotonic() - t0) * 1000)
    except UnsafeAddress as e:
        return AttemptResult(None, f"refused: {e}", (time.monotonic() - t0) * 1000)
    except httpx.HTTPError as e:
        return AttemptResult(None, f"{type(e).__name__}: {e}"[:500],
                             (time.monotonic() - t0) * 1000)


def retry_delay_s(settings: Settings, attempts: int) -> float:
    """Seconds before attempt ``attempts + 1``: exponential, capped."""
    return float(min(settings.webhook_retry_base_s * 2 ** (attempts - 1),
                     settings.webhook_retry_max_s))


def _outcome_fields(settings: Settings, d: WebhookDelivery, res: AttemptResult,
                    now: datetime) -> dict[str, Any]:
    n = d.attempts + 1
    fields: dict[str, Any] = {"attempts": n, "last_status_code": res.status_code,
                              "last_error": res.error}
    if res.ok:
        fields.update(status=repo.DELIVERED, delivered_at=now, next_attempt_at=None)
    elif n >= settings.webhook_max_attempts:
        fields.update(status=repo.FAILED, next_attempt_at=None)
    else:
        fields["next_attempt_at"] = now + timedelta(seconds=retry_delay_s(settings, n))
    return fields


def dispatch_once(sessions: sessionmaker[Session], settings: Settings) -> int:
    """Send what is due: claim each delivery (a committed lease), POST outside any
    transaction, record the attempt. Returns how many attempts were made."""
    with sessions() as s:
        ids = repo.due(s, utcnow(), DISPATCH_BATCH)
    if not ids:
        return 0
    made = 0
    timeout = httpx.Timeout(settings.webhook_timeout_s)
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for delivery_id in ids:
            with sessions() as s:
                d = repo.claim(s, delivery_id, utcnow(), settings.webhook_timeout_s + 30)
                hook = None if d is None else s.get(Webhook, d.webhook_id)
                s.commit()
            if d is None or hook is None:
                continue
            res = post(client, settings, hook.url, hook.secret, d.id, d.body)
            now = utcnow()
            try:
                with sessions() as s:
                    repo.record_attempt(
                        s, d, WebhookAttempt(delivery_id=d.id, number=d.attempts + 1, at=now,
                                             status_code=res.status_code, error=res.error,
                                             duration_ms=round(res.duration_ms, 1)),
                        **_outcome_fields(settings, d, res, now))
                    s.commit()
            except IntegrityError:  # the webhook was deleted meanwhile: its log went with it
                log.info("webhook %s deleted while delivery %s was sent", hook.id, d.id)
                continue
            made += 1
            if not res.ok:
                log.info("webhook %s delivery %s attempt %d: %s", hook.id, d.id,
                         d.attempts + 1, res.error)
    return made
