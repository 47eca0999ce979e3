"""Per-tenant request rate limit: ``rate_limit_per_min`` authenticated requests per minute.

Two backends behind one small interface:

- ``RedisLimiter`` (the broker is Redis: production, several API processes): a fixed one-minute
  window per tenant, counted with one atomic Lua script (INCR, EXPIRE on the first hit, TTL), so
  every API process shares the count. A client can send up to 2x the limit across a window
  boundary; that is the price of one round trip and one key per tenant.
- ``LocalLimiter`` (the embedded default, one API process): a token bucket per tenant in memory,
  ``limit`` tokens deep, refilled at ``limit / 60`` tokens per second.

``check`` returns None (allowed) or the seconds to wait (``Retry-After``). If Redis cannot be
reached the request is let through (logged): the limiter protects capacity, it must not turn a
Redis hiccup into an outage of the API.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Protocol

from app.config import Settings
from app.errors import RateLimited

log = logging.getLogger(__name__)

WINDOW_S = 60  # the limit is per minute

# KEYS[1] = the tenant's window counter; ARGV[1] = window seconds. Returns {count, ttl_ms}.
_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1] * 1000) end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1] * 1000); ttl = ARGV[1] * 1000 end
return {n, ttl}
"""


class Limiter(Protocol):
    limit_per_min: int
    blocking: bool  # True: check() does network I/O (call it off the event loop)

    def check(self, tenant_id: str) -> int | None: ...


class Unlimited:
    limit_per_min, blocking = 0, False

    def check(self, tenant_id: str) -> int | None:
        return None


class LocalLimiter:
    blocking = False

    def __init__(self, limit_per_min: int, max_tenants: int = 100_000) -> None:
        self.limit_per_min = limit_per_min
        self.rate_per_s = limit_per_min / WINDOW_S
        self.max_tenants = max_tenants
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at monotonic s)
        self._lock = threading.Lock()  # routes run in the threadpool too

    def check(self, tenant_id: str) -> int | None:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(tenant_id, (float(self.limit_per_min), now))
            tokens = min(float(self.limit_per_min), tokens + (now - at) * self.rate_per_s)
            if tokens >= 1.0:
                if len(self._buckets) >= self.max_tenants and tenant_id not in self._buckets:
                    self._buckets.clear()  # crude memory bound: forgets (grants) partial buckets
                self._buckets[tenant_id] = (tokens - 1.0, now)
                return None
            self._buckets[tenant_id] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.rate_per_s))


class RedisLimiter:
    blocking = True

    def __init__(self, limit_per_min: int, url: str, prefix: str = "modelpress:ratelimit:",
                 ) -> None:
        import redis

        self.limit_per_min = limit_per_min
        self.prefix = prefix
        # Short timeouts, seconds: this sits on every request's path.
        self._client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._script: Any = self._client.register_script(_LUA)

    def check(self, tenant_id: str) -> int | None:
        import redis

        try:
            count, ttl_ms = self._script(keys=[self.prefix + tenant_id], args=[WINDOW_S])
        except redis.RedisError:
            log.warning("rate limiter: Redis unreachable, request let through", exc_info=True)
            return None
        if int(count) <= self.limit_per_min:
            return None
        return max(1, math.ceil(int(ttl_ms) / 1000))


def make_limiter(settings: Settings) -> Limiter:
    if settings.rate_limit_per_min <= 0:
        return Unlimited()
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return RedisLimiter(settings.rate_limit_per_min, settings.broker_url)
    return LocalLimiter(settings.rate_limit_per_min)


def enforce(limiter: Limiter, tenant_id: str) -> None:
    """Raise RateLimited (429, ``Retry-After``) when the tenant is past its limit."""
    retry_after = limiter.check(tenant_id)
    if retry_after is not None:
        raise RateLimited(f"more than {limiter.limit_per_min} requests per minute for this "
                          f"tenant; retry after {retry_after} s", retry_after)
