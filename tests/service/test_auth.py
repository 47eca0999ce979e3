"""Bearer API keys: hashed at rest, refused in the query string, revocation and expiry honoured,
every read scoped to the key's tenant (another tenant's id is a 404)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import select

from app.config import Settings
from app.db.base import utcnow
from app.db.models import ApiKey, Model
from app.db.session import session_factory
from app.services.admin import create_key, ensure_dev_key
from app.services.auth import hash_key
from tests.service.conftest import new_key

pytestmark = pytest.mark.service


def _problem(resp: Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    assert body["code"] == code and body["status"] == status
    return body


def _add_model(settings: Settings, key: str) -> str:
    with session_factory(settings)() as s:
        tenant_id = s.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
        m = Model(tenant_id=tenant_id, filename="m.pt2", format="pt2",
                  inputs=[{"name": "x", "shape": [None, 4], "dtype": "float32"}],
                  outputs=[], parameters=1, sha256="0" * 64, size_bytes=1,
                  storage_key="models/x/y/model.pt2")
        s.add(m)
        s.commit()
        return m.id


def test_missing_or_bad_key_is_401(client: TestClient, key: str) -> None:
    body = _problem(client.get("/v1/models"), 401, "unauthorized")
    assert "Bearer" in body["detail"]
    _problem(client.get("/v1/models", headers={"Authorization": "Bearer mp_nope"}), 401,
             "unauthorized")
    _problem(client.get("/v1/models", headers={"Authorization": f"Basic {key}"}), 401,
             "unauthorized")
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_key_in_query_string_refused(client: TestClient, key: str) -> None:
    # Even together with a valid header: the URL (and so access logs) must never carry keys.
    r = client.get(f"/v1/models?api_key={key}", headers={"Authorization": f"Bearer {key}"})
    assert "query string" in _problem(r, 401, "unauthorized")["detail"]
    _problem(client.get(f"/v1/jobs?token={key}"), 401, "unauthorized")
    h = {"Authorization": f"Bearer {key}"}
    # Every credential-looking name, any case, on the lean polled route and on an upload
    # (refused before the body is read) as well.
    for name in ("api_key", "APIKEY", "key", "token", "access_token", "auth", "Authorization"):
        for method, url in (("GET", f"/v1/jobs/{'0' * 32}?{name}={key}"),
                            ("POST", f"/v1/models?filename=m.pt2&{name}={key}")):
            r = client.request(method, url, headers=h, content=b"x" if method == "POST" else None)
            assert "query string" in _problem(r, 401, "unauthorized")["detail"], (name, url)


def test_keys_stored_hashed(settings: Settings, key: str) -> None:
    with session_factory(settings)() as s:
        rows = s.scalars(select(ApiKey)).all()
    assert len(rows) == 1
    assert rows[0].key_hash == hash_key(key) and key not in (rows[0].key_hash, rows[0].prefix)
    assert key.startswith(rows[0].prefix)


def test_revoked_and_expired_keys_401(client: TestClient, settings: Settings, key: str) -> None:
    h = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=h).status_code == 200
    with session_factory(settings)() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
        assert row is not None
        row.revoked_at = utcnow()
        s.commit()
    assert "revoked" in _problem(client.get("/v1/jobs", headers=h), 401, "unauthorized")["detail"]
    # The lean GET /v1/jobs/{id} checks the key in its own joined query: same answer.
    r = client.get(f"/v1/jobs/{'0' * 32}", headers=h)
    assert "revoked" in _problem(r, 401, "unauthorized")["detail"]
    with session_factory(settings)() as s:
        k2 = create_key(s, "tenant-a", expires_at=utcnow() - timedelta(seconds=1))
        s.commit()
    for url in ("/v1/jobs", f"/v1/jobs/{'0' * 32}"):
        r = client.get(url, headers={"Authorization": f"Bearer {k2}"})
        assert "expired" in _problem(r, 401, "unauthorized")["detail"], url


def test_other_tenants_ids_are_404(client: TestClient, settings: Settings, key: str) -> None:
    model_id = _add_model(settings, key)
    other = new_key(settings, "tenant-b")
    mine = client.get(f"/v1/models/{model_id}", headers={"Authorization": f"Bearer {key}"})
    assert mine.status_code == 200 and mine.json()["id"] == model_id
    theirs = client.get(f"/v1/models/{model_id}", headers={"Authorization": f"Bearer {other}"})
    _problem(theirs, 404, "not_found")
    listed = client.get("/v1/models", headers={"Authorization": f"Bearer {other}"}).json()
    assert listed["items"] == []
    # A job naming another tenant's model is a 404 too, not a leak of its existence.
    r = client.post("/v1/jobs", headers={"Authorization": f"Bearer {other}"},
                    json={"model_id": model_id, "dataset_id": "x",
                          "constraints": {"max_size_mb": 1}})
    _problem(r, 404, "not_found")


def test_dev_key_created_once(settings: Settings, clean_db: None) -> None:
    with session_factory(settings)() as s:
        first = ensure_dev_key(s)
        s.commit()
        second = ensure_dev_key(s)
    assert first is not None and first.startswith("mp_")
    assert second is None


def test_auth_cache_bounds_revocation_lag(settings: Settings, key: str) -> None:
    """With the per-process cache on, a revoked key stops working within ``auth_cache_s``."""
    import time

    from app.main import create_app

    cached = settings.model_copy(update={"auth_cache_s": 0.5})
    h = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(cached)) as c:
        assert c.get("/v1/jobs", headers=h).status_code == 200
        with session_factory(settings)() as s:
            row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
            assert row is not None
            row.revoked_at = utcnow()
            s.commit()
        revoked_at = time.monotonic()
        while c.get("/v1/jobs", headers=h).status_code == 200:
            assert time.monotonic() - revoked_at < 0.5 + 0.3, "revoked key outlived the TTL"
            time.sleep(0.05)
        assert c.get("/v1/jobs", headers=h).status_code == 401
