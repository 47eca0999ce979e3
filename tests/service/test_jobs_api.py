"""POST/GET/list/cancel of jobs: validation, idempotency, enqueue-after-commit, cursors."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.config import Settings
from app.db.base import utcnow
from app.db.models import ApiKey, Job
from app.db.repositories import jobs as repo
from app.db.session import session_factory
from app.services.auth import hash_key
from tests.service.conftest import QuietBroker, seed_model_and_data

pytestmark = pytest.mark.service


def _job_count(settings: Settings) -> int:
    with session_factory(settings)() as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


@pytest.fixture
def ids(settings: Settings, key: str) -> tuple[str, str]:
    return seed_model_and_data(settings, key)


def _body(ids: tuple[str, str], **kw: Any) -> dict[str, Any]:
    return {"model_id": ids[0], "dataset_id": ids[1], **kw}


@pytest.mark.parametrize("bad", [
    {},  # nothing stated and no recipe
    {"constraints": {"batch_size": 8}},  # still no limit stated
    {"constraints": {"max_size_mb": -1}},
    {"constraints": {"max_latency_ms": 0}},
    {"constraints": {"max_accuracy_drop": 1.5}},
    {"constraints": {"max_size_mb": 1, "time_budget_s": -5}},
    {"constraints": {"max_size_mb": 1, "max_sizee_mb": 2}},  # unknown field
    {"constraints": {"max_size_mb": 1}, "colour": "red"},
    {"recipe": {"prune_ratio": -0.1}},
    {"recipe": {"quant": "int3"}},
    {"constraints": {"max_size_mb": 1}, "device": "tpu"},
])
def test_invalid_job_is_422(api: TestClient, auth: dict[str, str], ids: tuple[str, str],
                            settings: Settings, quiet_broker: QuietBroker,
                            bad: dict[str, Any]) -> None:
    r = api.post("/v1/jobs", json=_body(ids, **bad), headers=auth)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "validation_error" and r.json()["errors"]
    assert _job_count(settings) == 0 and quiet_broker.messages() == []


def test_submit_202_location_and_message_after_commit(
        api: TestClient, auth: dict[str, str], ids: tuple[str, str],
        quiet_broker: QuietBroker) -> None:
    r = api.post("/v1/jobs", headers=auth, json=_body(
        ids, constraints={"max_size_mb": 0.5, "max_accuracy_drop": 0.02}, device="cpu"))
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0 and job["attempt"] == 0
    assert job["queue"] == "cpu" and job["constraints"]["max_size_mb"] == 0.5
    assert job["constraints"]["batch_size"] == 1 and job["recipe"] is None
    assert quiet_broker.messages("cpu") == [{"task": "modelpress.jobs.run", "args": [job["id"]]}]
    got = api.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert got["id"] == job["id"] and got["status"] == "queued"
    r = api.post("/v1/jobs", headers=auth, json=_body(ids, recipe={"quant": "fp16"},
                                                      device="cuda"))
    assert r.status_code == 202 and r.json()["queue"] == "gpu"
    assert r.json()["recipe"]["quant"] == "fp16"
    assert [m["args"] for m in quiet_broker.messages("gpu")] == [[r.json()["id"]]]


def test_unknown_model_or_data_404(api: TestClient, auth: dict[str, str],
                                   ids: tuple[str, str], quiet_broker: QuietBroker) -> None:
    r = api.post("/v1/jobs", headers=auth, json={"model_id": ids[0], "dataset_id": "nope",
                                                 "constraints": {"max_size_mb": 1}})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    r = api.post("/v1/jobs", headers=auth, json=_body(ids, eval_dataset_id="gone",
                                                      constraints={"max_size_mb": 1}))
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert api.get("/v1/jobs/nope", headers=auth).status_code == 404
    assert quiet_broker.messages() == []


def test_idempotency_key_replays_first_job(api: TestClient, auth: dict[str, str],
                                           ids: tuple[str, str], settings: Settings,
                                           quiet_broker: QuietBroker) -> None:
    h = {**auth, "Idempotency-Key": "job-42"}
    body = _body(ids, constraints={"max_size_mb": 1})
    first = api.post("/v1/jobs", json=body, headers=h)
    second = api.post("/v1/jobs", json=body, headers=h)
    assert first.status_code == second.status_code == 202
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    assert second.headers["idempotent-replayed"] == "true"
    assert _job_count(settings) == 1 and len(quiet_broker.messages()) == 1
    # Same key, different request: refused, nothing created.
    other = api.post("/v1/jobs", json=_body(ids, constraints={"max_size_mb": 2}), headers=h)
    assert other.status_code == 409 and other.json()["code"] == "conflict"
    # Keys are per tenant: another tenant's identical key is independent.
    assert _job_count(settings) == 1


def _insert_jobs(settings: Settings, key: str, ids: tuple[str, str], n: int) -> list[str]:
    base = utcnow()
    with session_factory(settings)() as s:
        tenant_id = s.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
        out = []
        for i in range(n):
            job = repo.add(s, Job(tenant_id=tenant_id, model_id=ids[0], dataset_id=ids[1],
                                  constraints={"max_size_mb": 1}, status="queued",
                                  created_at=base + timedelta(seconds=i)))
            out.append(job.id)
        s.commit()
    return out


def test_cursor_pagination(api: TestClient, auth: dict[str, str], ids: tuple[str, str],
                           settings: Settings, key: str) -> None:
    created = _insert_jobs(settings, key, ids, 5)
    with session_factory(settings)() as s:  # two share a timestamp: the id breaks the tie
        s.execute(update(Job).where(Job.id == created[3]).values(
            created_at=select(Job.created_at).where(Job.id == created[2]).scalar_subquery()))
        s.execute(update(Job).where(Job.id == created[0]).values(status="failed"))
        s.commit()
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        q = "/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = api.get(q, headers=auth).json()
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and len(seen) == 5 and set(seen) == set(created)
    assert seen[0] == created[4] and seen[-1] == created[0]  # newest first
    failed = api.get("/v1/jobs?status=failed", headers=auth).json()
    assert [j["id"] for j in failed["items"]] == [created[0]]
    r = api.get("/v1/jobs?cursor=%%%garbage", headers=auth)
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    assert api.get("/v1/jobs?limit=0", headers=auth).status_code == 422
    assert api.get("/v1/jobs?status=weird", headers=auth).status_code == 422


def test_cancel(api: TestClient, auth: dict[str, str], ids: tuple[str, str],
                settings: Settings, key: str) -> None:
    queued, running, done = _insert_jobs(settings, key, ids, 3)
    r = api.post(f"/v1/jobs/{queued}:cancel", headers=auth)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None and r.json()["error"]["code"] == "cancelled"
    assert api.post(f"/v1/jobs/{queued}:cancel", headers=auth).json()["status"] == "cancelled"
    with session_factory(settings)() as s:  # the queued message arrives later: no claim
        assert repo.claim(s, queued, "w0", 30) is None
        assert repo.claim(s, running, "w1", 30) is not None
        s.execute(update(Job).where(Job.id == done).values(status="succeeded"))
        s.commit()
    r = api.post(f"/v1/jobs/{running}:cancel", headers=auth)
    assert r.status_code == 200
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    with session_factory(settings)() as s:  # the worker learns it at its next heartbeat
        assert repo.heartbeat(s, running, "w1", 30) is True
    r = api.post(f"/v1/jobs/{done}:cancel", headers=auth)
    assert r.status_code == 409 and r.json()["code"] == "conflict"
    assert api.post("/v1/jobs/nope:cancel", headers=auth).status_code == 404
