"""Tenant isolation over the whole API, and keys never at rest in plaintext.

The matrix enumerates the OpenAPI document, so a route added later is covered (or the test
fails asking for a value of its new id). For every operation that takes an id (a path
parameter, a ``*_id`` query parameter or a ``*_id`` field of its JSON body), tenant B sends
tenant A's ids and must get a 404 problem whose body is the one an unknown id gets (the same
bytes once the id itself is blanked out), while A's own request with the same ids is not a
404 (so the ids are real).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from app.config import Settings
from tests.service.conftest import new_key, npz_bytes
from tests.service.seed import Seeded, seed_tenant

pytestmark = pytest.mark.service

UNKNOWN = "0123456789abcdef0123456789abcdef"  # a well-formed id no tenant has
# A minimal valid JSON body per operation whose body carries ids (beyond the ids themselves).
BODIES: dict[str, dict[str, Any]] = {
    "POST /v1/jobs": {"constraints": {"max_size_mb": 1.0}},
    "PATCH /v1/webhooks/{webhook_id}": {"enabled": True},
}
# Raw-body uploads: a small valid data file (the seeded model's input x: [N, 1, 8, 8] float32).
RAW_BODIES: dict[str, bytes] = {}


def _raw_dataset() -> bytes:
    import numpy as np

    return npz_bytes(x=np.zeros((16, 1, 8, 8), np.float32),
                     labels=np.arange(16, dtype=np.int64) % 10)


def _id_operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, operation) of every operation that takes an id somewhere."""
    out = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            params = op.get("parameters", [])
            takes_id = any(p["in"] == "path" or p["name"].endswith("_id") for p in params)
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                schema = _resolve(doc, body["schema"])
                takes_id |= any(k.endswith("_id") for k in schema.get("properties", {}))
            if takes_id:
                out.append((method.upper(), path, op))
    return out


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return _resolve(doc, node)


def _request(client: TestClient, doc: dict[str, Any], method: str, path: str,
             op: dict[str, Any], ids: dict[str, str], key: str) -> Response:
    label = f"{method} {path}"
    url = path
    query: dict[str, str] = {}
    for p in op.get("parameters", []):
        name = p["name"]
        if p["in"] == "path":
            assert name in ids, f"{label}: the matrix has no value for path id {name!r}"
            url = url.replace("{" + name + "}", ids[name])
        elif p["in"] == "query" and name.endswith("_id"):
            assert name in ids, f"{label}: the matrix has no value for query id {name!r}"
            query[name] = ids[name]
    headers = {"Authorization": f"Bearer {key}"}
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        assert label in BODIES, f"{label}: add a minimal body to BODIES"
        schema = _resolve(doc, content["application/json"]["schema"])
        body = {**BODIES[label], **{k: ids[k.removeprefix("eval_")] for k in
                                    schema.get("properties", {}) if k.endswith("_id")}}
        return client.request(method, url, params=query, json=body, headers=headers)
    if "application/octet-stream" in content:
        return client.request(method, url, params={**query, "filename": "data.npz"},
                              content=RAW_BODIES.setdefault(label, _raw_dataset()),
                              headers=headers)
    return client.request(method, url, params=query, headers=headers)


def _blank(body: dict[str, Any], ids: dict[str, str]) -> str:
    text = json.dumps(body, sort_keys=True)
    for value in sorted(ids.values(), key=len, reverse=True):
        text = text.replace(value, "<id>")
    return text


def test_other_tenants_ids_are_404_on_every_route(api: TestClient, settings: Settings,
                                                  key: str) -> None:
    seeded: Seeded = seed_tenant(settings, key)
    theirs = seeded.path_values()
    unknown = {k: (UNKNOWN if k.endswith("_id") else "unknown.bin") for k in theirs}
    other = new_key(settings, "tenant-b")
    doc = api.get("/openapi.json").json()
    ops = _id_operations(doc)
    labels = {f"{m} {p}" for m, p, _ in ops}
    # The enumeration itself: every id-taking route of today is in it.
    assert {"GET /v1/models/{model_id}", "GET /v1/datasets/{dataset_id}",
            "GET /v1/jobs/{job_id}", "POST /v1/jobs/{job_id}:cancel",
            "GET /v1/jobs/{job_id}/report", "GET /v1/jobs/{job_id}/artifacts",
            "GET /v1/jobs/{job_id}/artifacts/{name}", "HEAD /v1/jobs/{job_id}/artifacts/{name}",
            "POST /v1/datasets",
            "POST /v1/jobs"} <= labels, labels

    for method, path, op in ops:
        label = f"{method} {path}"
        cross = _request(api, doc, method, path, op, theirs, other)
        assert cross.status_code == 404, (label, cross.status_code, cross.text)
        if method == "HEAD":  # no body to compare
            assert _request(api, doc, method, path, op, unknown, other).status_code == 404
            continue
        assert cross.headers["content-type"].startswith("application/problem+json"), label
        assert cross.json()["code"] == "not_found", label
        missing = _request(api, doc, method, path, op, unknown, other)
        assert missing.status_code == 404, (label, missing.text)
        assert _blank(cross.json(), theirs) == _blank(missing.json(), unknown), label

    # The owner's requests with the same ids are not 404s: the ids above were real. DELETEs
    # last: they remove the id the other requests need.
    for method, path, op in sorted(ops, key=lambda o: o[0] == "DELETE"):
        mine = _request(api, doc, method, path, op, theirs, key)
        assert mine.status_code != 404, (f"{method} {path}", mine.text)
        assert mine.status_code < 500, (f"{method} {path}", mine.text)


def _pg_dump() -> str | None:
    for candidate in ("/usr/lib/postgresql/15/bin/pg_dump", shutil.which("pg_dump")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def test_no_plaintext_key_in_a_database_dump(api: TestClient, settings: Settings, key: str,
                                             tmp_path: Path) -> None:
    """A full pg_dump (schema + data) of the test database holds no key, only its sha256."""
    from app.services.auth import hash_key

    # Use the key on a few routes first: nothing it touches may write it down either.
    auth = {"Authorization": f"Bearer {key}", "Idempotency-Key": "dump-1"}
    assert api.get("/v1/models", headers=auth).status_code == 200
    seeded = seed_tenant(settings, key)
    r = api.post("/v1/jobs", headers=auth, json={"model_id": seeded.model_id,
                                                 "dataset_id": seeded.dataset_id,
                                                 "constraints": {"max_size_mb": 1}})
    assert r.status_code == 202, r.text
    pg_dump = _pg_dump()
    assert pg_dump is not None, "pg_dump not installed (postgresql-client)"
    out = tmp_path / "dump.sql"
    subprocess.run([pg_dump, "--no-owner", "-f", str(out), settings.database_url], check=True,
                   timeout=120)
    dump = out.read_text(errors="replace")
    assert "COPY public.api_keys" in dump and hash_key(key) in dump  # the dump has the row
    secret = key.removeprefix("mp_")
    assert key not in dump and secret not in dump
    # Nor any 20-character piece of it (a truncated or re-encoded copy).
    assert not any(secret[i:i + 20] in dump for i in range(len(secret) - 19))
    assert re.search(r"mp_[A-Za-z0-9_-]{40,}", dump) is None
