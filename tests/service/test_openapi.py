"""The OpenAPI document as a contract (see also tests/client/test_generated_client.py, which
generates a client from it and runs a job): every error is a typed Problem under
application/problem+json, downloads are octet streams, every header the routes read is a
declared parameter, a bearer scheme, readable operationIds, enums for stage and error code that
cover what the code emits, and /docs + /redoc that work offline."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

import app.api.errors as api_errors
import app.errors as app_errors
import app.services.pipeline as service_pipeline
from app.engine.errors import EngineError
from app.engine.types import STAGES
from app.schemas.common import ErrorCode
from app.schemas.jobs import JobStage
from app.storage import StorageWriteError

pytestmark = pytest.mark.service

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


def test_error_code_enum_covers_every_code_the_service_emits() -> None:
    codes = {c.code for c in {app_errors.AppError, *_subclasses(app_errors.AppError)}}
    codes |= {c.code for c in {EngineError, *_subclasses(EngineError)}}
    codes |= {StorageWriteError.code, service_pipeline.LeaseLost.code}
    codes |= set(app_errors.ENGINE_STATUS) | set(api_errors._STATUS_CODES.values())
    # Written as literals by the worker and the reaper (app/services/pipeline.py, maintenance).
    codes |= {"internal_error", "timeout", "cancelled", "worker_lost", "http_error"}
    missing = codes - {c.value for c in ErrorCode}
    assert not missing, f"add to app.schemas.common.ErrorCode: {sorted(missing)}"


def test_stage_enum_covers_every_stage() -> None:
    assert set(STAGES) | {"store", "done"} <= {s.value for s in JobStage}


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), p, op) for p, item in doc["paths"].items() for m, op in item.items()]


def test_document_is_a_usable_contract(api: TestClient) -> None:
    doc = api.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    bearer = doc["components"]["securitySchemes"]["bearer"]  # the Authorize button of /docs
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    ids = {}
    for method, path, op in _operations(doc):
        assert re.fullmatch(r"[a-z]+([A-Z][a-z0-9]*)*", op["operationId"]), op["operationId"]
        ids[op["operationId"]] = f"{method} {path}"
        if path.startswith("/v1/"):
            assert op["security"] == [{"bearer": []}], (method, path)
        for status, resp in op["responses"].items():
            if int(status) >= 400:  # one media type, with the schema
                assert resp["content"] == {"application/problem+json": {"schema": PROBLEM_REF}
                                           }, (method, path, status)
    assert {"createJob", "getJob", "listJobs", "cancelJob", "getJobReport", "listArtifacts",
            "downloadArtifact", "headArtifact", "uploadModel", "uploadDataset", "getModel",
            "listModels", "getDataset", "listDatasets"} <= set(ids), ids

    download = doc["paths"]["/v1/jobs/{job_id}/artifacts/{name}"]["get"]
    for status in ("200", "206"):
        assert list(download["responses"][status]["content"]) == ["application/octet-stream"]
    headers = {p["name"] for p in download["parameters"] if p["in"] == "header"}
    assert headers == {"Range", "If-None-Match", "If-Range"}
    for upload in ("/v1/models", "/v1/datasets"):
        op = doc["paths"][upload]["post"]
        assert {p["name"] for p in op["parameters"] if p["in"] == "header"} == {
            "Idempotency-Key", "X-Filename", "Content-Disposition"}, upload
    create = doc["paths"]["/v1/jobs"]["post"]
    assert {p["name"] for p in create["parameters"] if p["in"] == "header"} == {
        "Idempotency-Key"}

    # Typed results: the report, the job's metrics and enums, not free objects and strings.
    report = doc["paths"]["/v1/jobs/{job_id}/report"]["get"]["responses"]["200"]
    assert report["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobReport"}
    job = schemas["JobOut"]["properties"]
    assert {"$ref": "#/components/schemas/JobStage"} in job["stage"]["anyOf"]
    assert {"$ref": "#/components/schemas/JobMetrics"} in job["metrics"]["anyOf"]
    assert job["constraints"] == {"$ref": "#/components/schemas/ConstraintsOut"}
    assert schemas["Problem"]["properties"]["code"] == {"$ref": "#/components/schemas/ErrorCode"}
    assert set(schemas["ErrorCode"]["enum"]) == {c.value for c in ErrorCode}
    assert schemas["JobReport"]["properties"]["pareto"]["items"] == {
        "$ref": "#/components/schemas/ParetoPoint"}


def test_job_body_rule_is_in_the_document_and_matches_the_server(api: TestClient,
                                                                 auth: dict[str, str]) -> None:
    """A body without any limit nor recipe is a 422; the document says so (``not``), so a
    schema-valid body is an acceptable one, and a generator still sees one plain model."""
    doc = api.get("/openapi.json").json()
    schema = _resolve_refs(doc, doc["components"]["schemas"]["JobCreate"])
    ids = {"model_id": "m", "dataset_id": "d"}
    cases = [({}, False), ({"constraints": {"batch_size": 4}}, False),
             ({"constraints": {"max_size_mb": None}}, False),
             ({"constraints": {"max_size_mb": 2}}, True),
             ({"constraints": {"max_accuracy_drop": 0.01}}, True), ({"recipe": {}}, True),
             ({"recipe": None, "constraints": {"max_latency_ms": 3}}, True)]
    for extra, valid in cases:
        body = {**ids, **extra}
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(body))
        assert (not errors) == valid, (body, errors)
        r = api.post("/v1/jobs", headers=auth, json=body)
        # valid bodies reach the id lookup (unknown ids: 404); invalid ones are 422
        assert r.status_code == (404 if valid else 422), (body, r.text)


def _resolve_refs(doc: dict[str, Any], node: Any) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _resolve_refs(doc, doc["components"]["schemas"][node["$ref"].rsplit("/")[-1]])
        return {k: _resolve_refs(doc, v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_refs(doc, v) for v in node]
    return node


def test_unparsable_json_is_400_bad_request(api: TestClient, auth: dict[str, str]) -> None:
    """It was a 422 "1: JSON decode error"; the README's error table says 400 bad_request."""
    r = api.post("/v1/jobs", headers={**auth, "Content-Type": "application/json"},
                 content=b'{"model_id": ')
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == "bad_request" and "not valid JSON" in body["detail"], body
    # JSON that parses but does not fit is still a 422 with the field named.
    r = api.post("/v1/jobs", headers=auth, json={"model_id": "m"})
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    assert ["body", "dataset_id"] in [e["loc"] for e in r.json()["errors"]]


_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_nothing_from_a_cdn(api: TestClient, page: str) -> None:
    r = api.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), html
    urls = [a or b for a, b in _URL.findall(html)]
    assets = [u for u in urls if u.endswith((".js", ".css", ".png"))]
    assert len(assets) >= (3 if page == "/docs" else 2), urls  # js (+ css) + favicon
    for url in assets:
        got = api.get(url)
        assert got.status_code == 200 and len(got.content) > 500, (url, got.status_code)
    assert "/openapi.json" in urls or "'/openapi.json'" in html or '"/openapi.json"' in html


@pytest.mark.parametrize("headers", [{"X-Filename": "mine.pt2"},
                                     {"Content-Disposition": 'attachment; filename="mine.pt2"'}])
def test_declared_filename_headers_name_the_upload(api: TestClient, auth: dict[str, str],
                                                   headers: dict[str, str]) -> None:
    r = api.post("/v1/models", headers={**auth, **headers}, content=b"not a model " * 10)
    assert r.status_code == 422 and r.json()["code"] == "invalid_model", r.text
    assert "mine.pt2" in r.json()["detail"]
