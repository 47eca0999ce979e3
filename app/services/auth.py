"""API keys: generated once, stored as sha256, checked on every request."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.repositories import tenants as repo
from app.errors import Unauthorized

KEY_PREFIX = "mp_"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def generate_key() -> tuple[str, str, str]:
    """(plaintext, display prefix, sha256). 32 random bytes: hashing needs no salt/KDF."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    return raw, raw[: len(KEY_PREFIX) + 6], hash_key(raw)


class AuthCache:
    """Positive lookups kept ``ttl_s`` seconds (per process): one query fewer per request.

    The price: a revoked or expired key keeps working for at most ``ttl_s`` seconds in a
    process that saw it recently. ``ttl_s = 0`` disables the cache.
    """

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, key_hash: str) -> Principal | None:
        if self.ttl_s <= 0:
            return None
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key_hash: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()  # crude bound; a full refill costs one query per key
        self._entries[key_hash] = (time.monotonic() + self.ttl_s, principal)


def authenticate(session: Session, raw: str) -> Principal:
    key = repo.get_api_key_by_hash(session, hash_key(raw))
    if key is None:
        raise Unauthorized("unknown API key")
    now = utcnow()
    if key.revoked_at is not None and key.revoked_at <= now:
        raise Unauthorized("API key revoked")
    if key.expires_at is not None and key.expires_at <= now:
        raise Unauthorized("API key expired")
    return Principal(tenant_id=key.tenant_id, key_id=key.id)
