"""Per-tenant limits: request rate (429 + Retry-After), concurrent jobs (429 quota_exceeded)
and stored bytes (413 quota_exceeded), with the tenant's own overrides, correct under
concurrency against real Postgres."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select

from app.config import Settings
from app.db.models import ApiKey, BlobChunk, Dataset, Job
from app.db.repositories import tenants as tenant_repo
from app.db.session import session_factory
from app.errors import QuotaExceeded
from app.main import create_app
from app.schemas.jobs import JobCreate
from app.services import jobs as job_service
from app.services.auth import hash_key
from app.services.uploads import ingest_dataset
from app.storage import get_store
from tests.service.conftest import QuietBroker, new_key, npz_bytes, seed_model_and_data

pytestmark = pytest.mark.service


def _problem(r: Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["status"] == status
    return body


def _tenant_id(settings: Settings, key: str) -> str:
    with session_factory(settings)() as s:
        tid = s.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
    assert tid is not None
    return tid


def _set_quotas(settings: Settings, key: str, jobs: int | None, stored: int | None) -> None:
    with session_factory(settings)() as s:
        tenant_repo.set_quotas(s, _tenant_id(settings, key), jobs, stored)
        s.commit()


@pytest.fixture
def limited(settings: Settings, quiet_broker: QuietBroker,
            clean_db: None) -> Iterator[Settings]:
    """The test settings with a quiet broker; each test turns on the limits it checks."""
    yield settings.model_copy(update={"broker_url": quiet_broker.url})


# --- rate limit -------------------------------------------------------------------------


def test_rate_limit_shared_by_api_processes_in_redis(limited: Settings, key: str) -> None:
    """Broker = Redis: the count lives in Redis, so two API instances share one budget."""
    s = limited.model_copy(update={"rate_limit_per_min": 5})
    auth = {"Authorization": f"Bearer {key}"}
    other = {"Authorization": f"Bearer {new_key(limited, 'tenant-b')}"}
    with TestClient(create_app(s)) as a, TestClient(create_app(s)) as b:
        for i in range(5):  # alternate between the two "processes"
            assert (a if i % 2 == 0 else b).get("/v1/models", headers=auth).status_code == 200
        body = _problem(b.get("/v1/models", headers=auth), 429, "rate_limited")
        assert "5 requests per minute" in body["detail"]
        r = a.get("/v1/jobs/" + "0" * 32, headers=auth)  # the lean polled route too
        _problem(r, 429, "rate_limited")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # Per tenant: another tenant on the same processes is not throttled.
        assert a.get("/v1/models", headers=other).status_code == 200


def test_rate_limit_in_process_token_bucket(limited: Settings, key: str, tmp_path: Path,
                                            ) -> None:
    """Embedded default (broker not Redis): a token bucket in the process, refilled at
    limit/60 tokens per second; Retry-After says when the next token is there."""
    s = limited.model_copy(update={"rate_limit_per_min": 30,  # 0.5 token/s
                                   "broker_url": f"sqla+sqlite:///{tmp_path}/broker.db"})
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(s)) as c:
        start, admitted = time.monotonic(), 0
        while (r := c.get("/v1/jobs", headers=auth)).status_code == 200:
            admitted += 1
            # The bucket (30) plus what refilled meanwhile, however slow the machine is.
            assert admitted <= 31 + (time.monotonic() - start) * 0.5, "not limited"
        assert admitted >= 30
        _problem(r, 429, "rate_limited")
        retry_after = int(r.headers["retry-after"])
        assert 1 <= retry_after <= 2
        refused_at = time.monotonic()
        # Poll (not a fixed sleep): admitted again once a token has been refilled.
        while c.get("/v1/jobs", headers=auth).status_code == 429:
            assert time.monotonic() - refused_at < retry_after + 1.0, "no refill"
            time.sleep(0.1)


# --- concurrent jobs ----------------------------------------------------------------------


def _submit(c: TestClient, auth: dict[str, str], model_id: str, dataset_id: str) -> Response:
    return c.post("/v1/jobs", headers=auth, json={"model_id": model_id,
                                                  "dataset_id": dataset_id,
                                                  "constraints": {"max_size_mb": 1}})


def test_concurrent_jobs_quota(limited: Settings, key: str) -> None:
    s = limited.model_copy(update={"max_concurrent_jobs": 2})
    auth = {"Authorization": f"Bearer {key}"}
    m, d = seed_model_and_data(limited, key)
    other_key = new_key(limited, "tenant-b")
    om, od = seed_model_and_data(limited, other_key)
    with TestClient(create_app(s)) as c:
        first = _submit(c, auth, m, d)
        assert first.status_code == 202 and _submit(c, auth, m, d).status_code == 202
        body = _problem(_submit(c, auth, m, d), 429, "quota_exceeded")
        assert body["limit"] == 2 and body["used"] == 2
        # Another tenant has its own quota.
        assert _submit(c, {"Authorization": f"Bearer {other_key}"}, om, od).status_code == 202
        # A finished (here: cancelled) job frees its slot.
        assert c.post(f"/v1/jobs/{first.json()['id']}:cancel",
                      headers=auth).json()["status"] == "cancelled"
        assert _submit(c, auth, m, d).status_code == 202
        _problem(_submit(c, auth, m, d), 429, "quota_exceeded")
        # The tenant's own row overrides the default.
        _set_quotas(limited, key, jobs=3, stored=None)
        assert _submit(c, auth, m, d).status_code == 202
        _problem(_submit(c, auth, m, d), 429, "quota_exceeded")


def _race(n: int, work: Any) -> list[Any]:
    """Run ``work(barrier)`` in n threads released together; results or exceptions."""
    barrier = threading.Barrier(n)

    def run(_: int) -> Any:
        try:
            return work(barrier)
        except Exception as e:
            return e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_parallel_submits_cannot_both_take_the_last_slot(limited: Settings, key: str) -> None:
    """Threads on their own sessions against real Postgres, each holding its transaction
    open a moment before committing (the widest race window): exactly one passes."""
    s = limited.model_copy(update={"max_concurrent_jobs": 1})
    m, d = seed_model_and_data(limited, key)
    tenant_id = _tenant_id(limited, key)
    body = JobCreate.model_validate({"model_id": m, "dataset_id": d,
                                     "constraints": {"max_size_mb": 1}})

    def submit(barrier: threading.Barrier) -> str:
        with session_factory(s)() as session:
            barrier.wait()
            job = job_service.create_job(session, s, tenant_id, body)
            time.sleep(0.3)  # fault injection: widen the window between count and commit
            session.commit()
            return job.id

    results = _race(4, submit)
    passed = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert len(passed) == 1 and len(refused) == 3, results
    with session_factory(limited)() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 1


# --- stored bytes ---------------------------------------------------------------------------


def _data(n: int = 64) -> bytes:
    return npz_bytes(x=np.zeros((n, 1, 8, 8), np.float32),
                     labels=np.arange(n, dtype=np.int64) % 10)


def _stored(settings: Settings) -> tuple[int, int]:
    with session_factory(settings)() as s:
        return (s.scalar(select(func.count()).select_from(Dataset)) or 0,
                s.scalar(select(func.count()).select_from(BlobChunk)) or 0)


def _upload_bytes_total() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("modelpress_upload_bytes_total",
                                     {"kind": "dataset"}) or 0.0


def test_stored_bytes_quota_refuses_while_streaming(limited: Settings, key: str) -> None:
    raw = _data()
    m, _ = seed_model_and_data(limited, key)  # rows only: 1 + 1 bytes already stored
    s = limited.model_copy(update={"max_stored_bytes": 2 + len(raw) + 100})
    auth = {"Authorization": f"Bearer {key}"}
    url = f"/v1/datasets?model_id={m}&filename=d.npz"
    with TestClient(create_app(s)) as c:
        assert c.post(url, content=raw, headers=auth).status_code == 201
        before = _stored(limited)
        # Content-Length past what is left: refused before the body is read.
        body = _problem(c.post(url, content=raw, headers=auth), 413, "quota_exceeded")
        assert "quota" in body["detail"]

        def chunked() -> Iterator[bytes]:  # no Content-Length: refused mid-stream
            for i in range(0, len(raw), 1000):
                yield raw[i:i + 1000]

        received = _upload_bytes_total()
        _problem(c.post(url, content=chunked(), headers=auth), 413, "quota_exceeded")
        # Refused while streaming: the body was never taken whole (the counter of received
        # upload bytes only grows for a body read to its end).
        assert _upload_bytes_total() == received
        assert _stored(limited) == before
        assert s.tmp_dir is not None and not any(s.tmp_dir.glob("upload-*"))
        # The tenant's override lifts it.
        _set_quotas(limited, key, jobs=None, stored=10 * len(raw))
        assert c.post(url, content=raw, headers=auth).status_code == 201


def test_parallel_uploads_cannot_both_take_the_last_bytes(limited: Settings, key: str,
                                                          tmp_path: Path) -> None:
    """Both uploads fit in what is left when they start (so both pass the streaming check);
    together they do not: the final check, under the tenant's row lock, lets one through and
    deletes the other's stored bytes."""
    raw = _data()
    m, _ = seed_model_and_data(limited, key)
    s = limited.model_copy(update={"max_stored_bytes": 2 + len(raw) + 100})
    tenant_id = _tenant_id(limited, key)
    store = get_store(s)
    before = _stored(limited)

    def upload(barrier: threading.Barrier) -> str:
        path = tmp_path / f"{threading.get_ident()}.npz"
        path.write_bytes(raw)
        with session_factory(s)() as session:
            barrier.wait()
            try:
                row = ingest_dataset(session, store, s, tenant_id, path, "d.npz", "npz", m)
                time.sleep(0.3)  # fault injection: widen the window before the commit
                session.commit()
            except BaseException:
                session.rollback()
                raise
            return row.id

    results = _race(2, upload)
    assert sum(isinstance(r, str) for r in results) == 1, results
    assert sum(isinstance(r, QuotaExceeded) and r.status == 413 for r in results) == 1, results
    rows, chunks = _stored(limited)
    assert rows == before[0] + 1
    assert chunks == before[1] + 1  # one upload's bytes (one chunk); the loser's deleted


def test_admin_set_quota_cli(limited: Settings, key: str, pg_url: str) -> None:
    """``modelpress admin set-quota`` writes the tenant's overrides (only the options given;
    ``default`` clears one), which the quota checks then use."""
    import os
    import subprocess
    import sys

    from app.db.models import Tenant

    env = {**os.environ, "MODELPRESS_DATABASE_URL": pg_url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", "admin", "set-quota",
                               "--tenant", "tenant-a", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    def row() -> tuple[int | None, int | None]:
        with session_factory(limited)() as s:
            t = s.get(Tenant, _tenant_id(limited, key))
            assert t is not None
            return t.max_concurrent_jobs, t.max_stored_bytes

    r = cli("--max-concurrent-jobs", "3", "--max-stored-bytes", "0")
    assert r.returncode == 0, r.stderr
    assert "max_concurrent_jobs 3" in r.stdout and "max_stored_bytes unlimited" in r.stdout
    assert row() == (3, 0)
    assert cli("--max-concurrent-jobs", "default").returncode == 0
    assert row() == (None, 0)
    assert cli("--max-stored-bytes", "-1").returncode == 2  # usage error
    bad = subprocess.run([sys.executable, "-m", "app.cli", "admin", "set-quota", "--tenant",
                          "nobody", "--max-stored-bytes", "1"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "no tenant" in bad.stderr
