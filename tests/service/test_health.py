"""Liveness, readiness against the real database and broker, Prometheus metrics."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app

pytestmark = pytest.mark.service


def test_healthz_readyz_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["broker"] == "ok"
    client.get("/v1/nothing-here")
    text = client.get("/metrics").text
    assert 'modelpress_http_requests_total{method="GET",route="/readyz",status="200"}' in text
    assert "modelpress_http_request_duration_seconds_bucket" in text


def test_readyz_503_when_broker_down(settings: Settings, clean_db: None) -> None:
    broken = settings.model_copy(update={"broker_url": "redis://localhost:1/0"})
    with TestClient(create_app(broken)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "unavailable" and "broker" in r.json()["detail"]


def test_unknown_route_is_problem(client: TestClient) -> None:
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
