"""Uploads: streamed, validated by the engine's sandboxed loader, capped, and never
half-written (a refused upload leaves no row and no bytes)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.config import Settings
from app.db.models import BlobChunk, Dataset, Model
from app.db.session import session_factory
from app.main import create_app
from tests.service.conftest import HIDDEN, npz_bytes

pytestmark = pytest.mark.service


def _counts(settings: Settings) -> tuple[int, int, int]:
    with session_factory(settings)() as s:
        return (s.scalar(select(func.count()).select_from(Model)) or 0,
                s.scalar(select(func.count()).select_from(Dataset)) or 0,
                s.scalar(select(func.count()).select_from(BlobChunk)) or 0)


def _tmp_empty(settings: Settings) -> bool:
    assert settings.tmp_dir is not None
    return not settings.tmp_dir.exists() or not any(settings.tmp_dir.iterdir())


def upload_model(client: TestClient, auth: dict[str, str], path: Path) -> dict[str, Any]:
    r = client.post(f"/v1/models?filename={path.name}", content=path.read_bytes(),
                    headers={**auth, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def test_upload_model_records_signature(client: TestClient, auth: dict[str, str],
                                        mlp_files: dict[str, Path], settings: Settings) -> None:
    raw = mlp_files["pt2"].read_bytes()
    r = client.post("/v1/models?filename=mlp.pt2", content=raw,
                    headers={**auth, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["location"] == f"/v1/models/{body['id']}"
    assert body["format"] == "pt2" and body["filename"] == "mlp.pt2"
    assert body["sha256"] == hashlib.sha256(raw).hexdigest()
    assert body["size_bytes"] == len(raw)
    assert [i["name"] for i in body["inputs"]] == ["x"]
    assert body["inputs"][0]["shape"][1:] == [1, 8, 8] and body["inputs"][0]["dtype"] == "float32"
    assert body["outputs"][0]["shape"][-1] == 10
    h = HIDDEN
    assert body["parameters"] == 64 * h + h + h * h + h + h * 10 + 10
    assert client.get(f"/v1/models/{body['id']}", headers=auth).json() == body
    assert _counts(settings)[0] == 1 and _counts(settings)[2] >= 1
    assert _tmp_empty(settings)


@pytest.mark.parametrize("case", ["random.pt2", "truncated.pt2", "random.onnx", "model.pkl",
                                  "empty.pt2"])
def test_bad_model_is_422_and_nothing_stored(client: TestClient, auth: dict[str, str],
                                             mlp_files: dict[str, Path], settings: Settings,
                                             case: str) -> None:
    raw = mlp_files["pt2"].read_bytes()
    content = {"random.pt2": b"\x00garbage" * 500, "truncated.pt2": raw[: len(raw) // 2],
               "random.onnx": b"not an onnx protobuf" * 50, "model.pkl": b"\x80\x04K\x01.",
               "empty.pt2": b""}[case]
    r = client.post(f"/v1/models?filename={case}", content=content, headers=auth)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] in {"invalid_model", "unsafe_model"}, r.json()
    assert r.json()["detail"]
    assert _counts(settings) == (0, 0, 0)
    assert _tmp_empty(settings)


def test_upload_cap_413_while_streaming(settings: Settings, clean_db: None, key: str) -> None:
    small = settings.model_copy(update={"max_model_bytes": 10_000})
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(small)) as c:
        r = c.post("/v1/models?filename=big.pt2", content=b"x" * 20_000, headers=auth)
        assert r.status_code == 413 and r.json()["code"] == "payload_too_large"

        def chunked() -> Iterator[bytes]:  # no Content-Length: the cap acts mid-stream
            for _ in range(50):
                yield b"y" * 1000

        r = c.post("/v1/models?filename=big.pt2", content=chunked(), headers=auth)
        assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert _counts(settings) == (0, 0, 0)
    assert _tmp_empty(settings)


def test_form_upload_is_415(client: TestClient, auth: dict[str, str],
                            mlp_files: dict[str, Path], settings: Settings) -> None:
    r = client.post("/v1/models", files={"file": ("mlp.pt2", mlp_files["pt2"].read_bytes())},
                    headers=auth)
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
    assert _counts(settings) == (0, 0, 0)


def test_dataset_validated_against_model(client: TestClient, auth: dict[str, str],
                                         mlp_files: dict[str, Path], settings: Settings) -> None:
    model = upload_model(client, auth, mlp_files["pt2"])
    x, y = np.load(mlp_files["x"])[:200], np.load(mlp_files["y"])[:200]
    url = f"/v1/datasets?model_id={model['id']}&filename=data.npz"

    r = client.post(url, content=npz_bytes(pixels=x, labels=y), headers=auth)
    assert r.status_code == 422 and r.json()["code"] == "input_mismatch"
    assert "'x'" in r.json()["detail"] or '"x"' in r.json()["detail"], r.json()

    r = client.post(url, content=npz_bytes(x=x[:, :, :4, :4], labels=y), headers=auth)
    assert r.status_code == 422 and r.json()["code"] == "input_mismatch"
    assert "x" in r.json()["detail"]

    r = client.post(url, content=b"not a zip", headers=auth)
    assert r.status_code == 422 and r.json()["code"] in {"invalid_data", "input_mismatch"}

    r = client.post("/v1/datasets?filename=data.npz", content=npz_bytes(x=x), headers=auth)
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    r = client.post("/v1/datasets?model_id=nope&filename=data.npz", content=npz_bytes(x=x),
                    headers=auth)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert _counts(settings)[1] == 0

    r = client.post(url, content=npz_bytes(x=x, labels=y), headers=auth)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["samples"] == 200 and ds["has_labels"] and ds["num_classes"] == 10
    assert ds["model_id"] == model["id"] and ds["format"] == "npz"
    assert client.get(f"/v1/datasets/{ds['id']}", headers=auth).json()["id"] == ds["id"]
    assert [d["id"] for d in client.get("/v1/datasets", headers=auth).json()["items"]] == [
        ds["id"]]
    assert _tmp_empty(settings)


def test_upload_idempotency_key_replays(client: TestClient, auth: dict[str, str],
                                        mlp_files: dict[str, Path], settings: Settings) -> None:
    raw = mlp_files["pt2"].read_bytes()
    h = {**auth, "Idempotency-Key": "upload-1"}
    first = client.post("/v1/models?filename=mlp.pt2", content=raw, headers=h)
    again = client.post("/v1/models?filename=mlp.pt2", content=raw, headers=h)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert _counts(settings)[0] == 1
    other = client.post("/v1/models?filename=other.pt2", content=raw, headers=h)
    assert other.status_code == 409 and other.json()["code"] == "conflict"


@pytest.mark.parametrize("declared_delta", [-500, +500], ids=["longer", "shorter"])
def test_body_not_matching_content_length_is_400(client: TestClient, auth: dict[str, str],
                                                 mlp_files: dict[str, Path], settings: Settings,
                                                 declared_delta: int) -> None:
    """A body longer than its Content-Length (bytes smuggled past what a proxy framed) or
    shorter (truncated) is refused whole: 400, no row, no bytes, no temp file. The in-process
    client hands the app the whole body whatever the header says, as a proxy or another ASGI
    server might; a real client going away mid-body is in test_upload_server.py."""
    raw = mlp_files["pt2"].read_bytes()  # a valid model: only the framing is wrong
    r = client.post("/v1/models?filename=mlp.pt2", content=raw,
                    headers={**auth, "Content-Type": "application/octet-stream",
                             "Content-Length": str(len(raw) + declared_delta)})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "content_length_mismatch"
    assert ("longer" if declared_delta < 0 else "shorter") in r.json()["detail"]
    assert _counts(settings) == (0, 0, 0)
    assert _tmp_empty(settings)
