"""Artifact download: streamed, strong ETag = sha256, Range -> 206, If-None-Match -> 304."""

from __future__ import annotations

import hashlib
import os

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.config import Settings
from app.db.models import ApiKey, Artifact, Job
from app.db.session import session_factory
from app.services.auth import hash_key
from app.storage import get_store
from tests.service.conftest import new_key, seed_model_and_data
from tests.service.seed import sample_result

pytestmark = pytest.mark.service

DATA = os.urandom(3 * 1024 * 1024 + 17)  # spans several 1 MiB store chunks


@pytest.fixture
def job_id(settings: Settings, key: str) -> str:
    model_id, dataset_id = seed_model_and_data(settings, key)
    store = get_store(settings)
    with session_factory(settings)() as s:
        tenant_id = s.scalar(select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key)))
        job = Job(tenant_id=tenant_id, model_id=model_id, dataset_id=dataset_id,
                  constraints={"max_size_mb": 1}, status="succeeded")
        s.add(job)
        s.flush()
        k = f"jobs/{job.id}/attempt-1/model.onnx"
        size, sha = store.put_stream(k, [DATA])
        s.add(Artifact(job_id=job.id, name="model.onnx", sha256=sha, size_bytes=size,
                       content_type="application/octet-stream", storage_key=k))
        s.commit()
        return job.id


def test_list_and_full_download(client: TestClient, auth: dict[str, str], job_id: str) -> None:
    items = client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth).json()["items"]
    assert [(a["name"], a["size_bytes"]) for a in items] == [("model.onnx", len(DATA))]
    r = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx", headers=auth)
    assert r.status_code == 200 and r.content == DATA
    assert r.headers["etag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert r.headers["accept-ranges"] == "bytes"
    assert int(r.headers["content-length"]) == len(DATA)
    assert items[0]["sha256"] == hashlib.sha256(r.content).hexdigest()


def test_range_requests(client: TestClient, auth: dict[str, str], job_id: str) -> None:
    url = f"/v1/jobs/{job_id}/artifacts/model.onnx"
    n = len(DATA)
    for header, start, end in [("bytes=0-99", 0, 100),
                               ("bytes=1048570-1048580", 1048570, 1048581),
                               (f"bytes={n - 10}-", n - 10, n),
                               ("bytes=-7", n - 7, n),
                               (f"bytes=5-{n + 100}", 5, n)]:
        r = client.get(url, headers={**auth, "Range": header})
        assert r.status_code == 206, (header, r.text)
        assert r.content == DATA[start:end], header
        assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{n}"
        assert int(r.headers["content-length"]) == end - start
    r = client.get(url, headers={**auth, "Range": f"bytes={n}-"})
    assert r.status_code == 416 and r.json()["code"] == "range_not_satisfiable"
    assert r.headers["content-range"] == f"bytes */{n}"
    # If-Range with a stale validator: the whole (changed) file instead of a broken splice.
    r = client.get(url, headers={**auth, "Range": "bytes=0-9", "If-Range": '"stale"'})
    assert r.status_code == 200 and len(r.content) == n


def test_conditional_get_304(client: TestClient, auth: dict[str, str], job_id: str) -> None:
    url = f"/v1/jobs/{job_id}/artifacts/model.onnx"
    etag = client.get(url, headers=auth).headers["etag"]
    r = client.get(url, headers={**auth, "If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    r = client.get(url, headers={**auth, "If-None-Match": '"other", ' + etag})
    assert r.status_code == 304
    assert client.get(url, headers={**auth, "If-None-Match": '"other"'}).status_code == 200


def test_missing_artifacts_and_report(client: TestClient, auth: dict[str, str], job_id: str,
                                      settings: Settings) -> None:
    r = client.get(f"/v1/jobs/{job_id}/artifacts/nope.bin", headers=auth)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = client.get(f"/v1/jobs/{job_id}/report", headers=auth)
    assert r.status_code == 409 and r.json()["code"] == "conflict"
    _, report = sample_result()
    with session_factory(settings)() as s:
        s.execute(update(Job).where(Job.id == job_id).values(report=report))
        s.commit()
    got = client.get(f"/v1/jobs/{job_id}/report", headers=auth).json()
    assert got["chosen"]["id"] == 1 and [c["id"] for c in got["candidates"]] == [0, 1]
    assert got["pareto"] == [{"candidate_id": 1, "metrics": report["candidates"][1]["metrics"]}]
    assert got["ratios"] == report["ratios"] and got["manifest"] == report["manifest"]
    other = {"Authorization": f"Bearer {new_key(settings, 'tenant-b')}"}
    assert client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx",
                      headers=other).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/report", headers=other).status_code == 404


def test_head_gives_the_download_headers_without_a_body(client: TestClient,
                                                       auth: dict[str, str],
                                                       job_id: str) -> None:
    """HEAD used to be 405: a client could not learn an artifact's size or ETag without
    downloading it."""
    url = f"/v1/jobs/{job_id}/artifacts/model.onnx"
    r = client.head(url, headers=auth)
    assert r.status_code == 200, r.text
    assert r.content == b"" and int(r.headers["content-length"]) == len(DATA)
    assert r.headers["etag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert r.headers["content-type"] == "application/octet-stream"
    assert client.head(url, headers={**auth, "If-None-Match": r.headers["etag"]}
                       ).status_code == 304
    assert client.head(f"/v1/jobs/{job_id}/artifacts/nope", headers=auth).status_code == 404
    assert client.head(url).status_code == 401


def test_a_failed_job_serves_its_report(client: TestClient, auth: dict[str, str],
                                        job_id: str, settings: Settings) -> None:
    """constraints_unsatisfiable: the candidates were measured and the best one stored, so
    the report is there (typed: every candidate with its id, the front with metrics)."""
    _, report = sample_result()
    report = {**report, "status": "constraints_unsatisfiable"}
    with session_factory(settings)() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            status="failed", error_code="constraints_unsatisfiable", report=report))
        s.commit()
    r = client.get(f"/v1/jobs/{job_id}/report", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "constraints_unsatisfiable"
    assert r.json()["pareto"][0]["metrics"]["size_bytes"] == 21_000
    with session_factory(settings)() as s:  # a job that failed before measuring anything
        s.execute(update(Job).where(Job.id == job_id).values(error_code="timeout",
                                                             report=None))
        s.commit()
    r = client.get(f"/v1/jobs/{job_id}/report", headers=auth)
    assert r.status_code == 409 and "yet" not in r.json()["detail"], r.text
    assert "failed (timeout) without a report" in r.json()["detail"]
