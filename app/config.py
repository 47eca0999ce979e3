"""Service configuration: typed settings read from ``MODELPRESS_*`` environment variables.

Units are in the names (``_bytes``, ``_s``). The embedded default needs no server: SQLite, a
local artifact directory and Celery on kombu's SQLAlchemy transport over a second SQLite file.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

StorageBackend = Literal["local", "postgres", "s3"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", extra="ignore")

    # --- persistence -------------------------------------------------------------------
    database_url: str = "sqlite:///./var/modelpress.db"
    # Embedded default: kombu's SQLAlchemy transport (checked with Celery 5.7 here).
    broker_url: str = "sqla+sqlite:///./var/broker.db"
    # None = "local" with SQLite, "postgres" (chunked table) with Postgres.
    storage_backend: StorageBackend | None = None
    storage_dir: Path = Path("./var/artifacts")
    # Uploads stream here before validation; None = the system temp dir.
    tmp_dir: Path | None = None

    # --- S3 (any S3-compatible endpoint) ---------------------------------------------------
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None

    # --- upload limits -----------------------------------------------------------------------
    max_model_bytes: int = 2 * 1024**3  # 2 GiB
    max_dataset_bytes: int = 2 * 1024**3  # 2 GiB
    # The sandboxed loader that inspects uploaded models.
    inspect_timeout_s: float = 120.0
    inspect_memory_mb: int = 4096
    # Network of that sandbox: "isolate" = a fresh, empty network namespace or the upload
    # fails closed (loader_failed); "hook_only" = explicitly weaker, no namespace, only a
    # Python audit hook against sockets (for hosts that forbid namespaces; see SECURITY.md).
    sandbox_network: Literal["isolate", "hook_only"] = "isolate"
    # Seconds an upload may go without receiving a byte before it is refused (408): a
    # trickling client must not hold a connection, a temp file and a worker slot forever.
    upload_idle_timeout_s: float = 30.0

    # --- jobs ----------------------------------------------------------------------------
    job_lease_s: float = 60.0  # a claim expires this long after the last heartbeat
    heartbeat_interval_s: float = 10.0  # must be well below job_lease_s
    # Throttle for progress writes, seconds (a stage change always writes).
    progress_write_interval_s: float = 0.5
    max_attempts: int = 3  # claims per job, counting the first
    # Celery limits: soft < hard < broker visibility timeout, so a task is never redelivered
    # while a live worker still runs it.
    job_soft_time_limit_s: int = 3600
    job_hard_time_limit_s: int = 3660
    broker_visibility_timeout_s: int = 7200
    auto_queue: Literal["cpu", "gpu"] = "cpu"  # queue for device="auto"
    # Queued jobs not picked up for this long are re-sent by the reconciler.
    requeue_after_s: float = 300.0
    reaper_interval_s: float = 30.0
    # Every worker's main process runs the reaper + reconciler every reaper_interval_s (the
    # statements are guarded, so several workers doing it is harmless). Celery beat can run
    # the same task (modelpress.maintenance.tick) instead when this is off.
    reaper_in_worker: bool = True
    # Import torch & co. in the worker's main process before the pool forks: a pool child
    # (a first one, or the replacement of one that died) then starts a job at once instead
    # of importing for seconds (~6 s here) while holding its lease. Off: each child imports.
    worker_preload_engine: bool = True

    # --- events and webhooks ------------------------------------------------------------
    # How often an open GET /v1/jobs/{id}/events re-reads job_events (one indexed query per
    # stream per interval; any API process serves any job).
    events_poll_interval_s: float = 0.5
    # An open stream with nothing to send ends after this long (the client resumes with
    # Last-Event-ID): a job that never starts must not pin a connection forever.
    events_stream_max_s: float = 3600.0
    # Progress events are coalesced: one needs this much more progress (0.01 = 1 point) or
    # this many seconds since the previous one (and a change); stage changes always emit.
    event_progress_step: float = 0.01
    event_progress_interval_s: float = 1.0
    # Webhook URLs resolving to loopback, private, link-local or other non-global addresses
    # are refused (SSRF: the service would post into its own network). Self-hosted setups
    # whose receivers live on the LAN turn this on knowingly.
    webhook_allow_private: bool = False
    webhook_timeout_s: float = 10.0  # per attempt: connect + send + response
    webhook_max_attempts: int = 8  # then the delivery is "failed"
    # Retry n waits base * 2**(n-1) seconds (capped): 5 s, 10 s, 20 s, ... up to 6 h.
    webhook_retry_base_s: float = 5.0
    webhook_retry_max_s: float = 6 * 3600.0
    # The dispatcher thread in every worker's main process looks for due deliveries this
    # often; off: run the Celery task modelpress.webhooks.dispatch (beat schedules it).
    webhook_poll_interval_s: float = 1.0
    webhooks_in_worker: bool = True

    # --- auth ----------------------------------------------------------------------------
    # Create a development tenant + key on first start (embedded default only by default).
    dev_key_bootstrap: bool | None = None
    dev_key_file: Path = Path("./var/dev-api-key")
    # Seconds a verified key is trusted without a query (per API process). A revoked key
    # stops working after at most this long; 0 = look up on every request.
    auth_cache_s: float = 2.0

    # --- per-tenant limits (0 = off) ------------------------------------------------------
    # Authenticated requests per tenant per minute; past it: 429 with Retry-After (seconds).
    # Counted in Redis when the broker is Redis (shared by every API process), else in the
    # process (the embedded default runs one).
    rate_limit_per_min: int = 600
    # Default quotas; a tenant's own row (tenants.max_concurrent_jobs / max_stored_bytes)
    # overrides them. Jobs counted: queued + running. Bytes: its uploaded models + data sets.
    max_concurrent_jobs: int = 8
    max_stored_bytes: int = 50 * 1024**3  # 50 GiB

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if not (self.job_soft_time_limit_s < self.job_hard_time_limit_s
                < self.broker_visibility_timeout_s):
            raise ValueError("need job_soft_time_limit_s < job_hard_time_limit_s "
                             "< broker_visibility_timeout_s")
        if self.heartbeat_interval_s >= self.job_lease_s:
            raise ValueError("heartbeat_interval_s must be below job_lease_s")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def resolved_storage_backend(self) -> StorageBackend:
        if self.storage_backend is not None:
            return self.storage_backend
        return "local" if self.is_sqlite else "postgres"

    @property
    def resolved_dev_key_bootstrap(self) -> bool:
        return self.is_sqlite if self.dev_key_bootstrap is None else self.dev_key_bootstrap


@lru_cache
def get_settings() -> Settings:
    return Settings()
