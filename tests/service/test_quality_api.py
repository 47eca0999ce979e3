"""Quality through the API: bad labels are invalid_data at upload, and a job's metric is
checked against the model's output width and the data's labels when it is submitted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.config import Settings
from app.db.models import Dataset, Job
from app.db.session import session_factory
from tests.service.conftest import npz_bytes

pytestmark = pytest.mark.service


def _count(settings: Settings, table: type[Any]) -> int:
    with session_factory(settings)() as s:
        return s.scalar(select(func.count()).select_from(table)) or 0


def _upload(c: TestClient, auth: dict[str, str], path: str, body: bytes) -> dict[str, Any]:
    r = c.post(path, content=body, headers={**auth, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


@pytest.fixture
def model_id(client: TestClient, auth: dict[str, str], mlp_files: dict[str, Path]) -> str:
    model = _upload(client, auth, "/v1/models?filename=mlp.pt2", mlp_files["pt2"].read_bytes())
    assert model["outputs"][0]["shape"][1:] == [10]
    return str(model["id"])


@pytest.mark.parametrize(("labels", "pattern"), [
    (lambda y: np.where(np.arange(len(y)) == 3, np.nan, y), r"integer class ids.*1 NaN"),
    (lambda y: np.where(np.arange(len(y)) == 5, -2, y), r"must be >= 0, found -2 \(first in "
                                                        r"sample 5\)"),
    (lambda y: y[:-1], r"expected 200 labels"),
])
def test_bad_labels_are_invalid_data(client: TestClient, auth: dict[str, str], model_id: str,
                                     mlp_files: dict[str, Path], settings: Settings,
                                     labels: Any, pattern: str) -> None:
    import re

    x, y = np.load(mlp_files["x"])[:200], np.load(mlp_files["y"])[:200]
    r = client.post(f"/v1/datasets?model_id={model_id}&filename=d.npz",
                 content=npz_bytes(x=x, labels=labels(y)), headers=auth)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "invalid_data" and re.search(pattern, problem["detail"]), problem
    assert "'labels'" in problem["detail"]
    assert _count(settings, Dataset) == 0


def test_metric_checked_at_submission(client: TestClient, auth: dict[str, str], model_id: str,
                                      mlp_files: dict[str, Path], settings: Settings) -> None:
    x, y = np.load(mlp_files["x"])[:200], np.load(mlp_files["y"])[:200]
    url = f"/v1/datasets?model_id={model_id}&filename=d.npz"
    unlabelled = _upload(client, auth, url, npz_bytes(x=x))["id"]
    # A class id past the 10 outputs is accepted at upload (the output may be an embedding:
    # only the job's metric says), and refused by a job that judges by class.
    wide = _upload(client, auth, url, npz_bytes(x=x, labels=np.where(y == 9, 12, y)))["id"]
    labelled = _upload(client, auth, url, npz_bytes(x=x, labels=y))["id"]

    def submit(dataset: str, metric: str, **kw: Any) -> Any:
        return client.post("/v1/jobs", headers=auth, json={
            "model_id": model_id, "dataset_id": dataset, **kw,
            "constraints": {"max_accuracy_drop": 0.01, "metric": metric}})

    r = submit(unlabelled, "accuracy")
    assert r.status_code == 422 and r.json()["code"] == "invalid_data", r.text
    assert "'accuracy' needs labels, but the dataset has no 'labels' key" in r.json()["detail"]
    r = submit(labelled, "accuracy", eval_dataset_id=unlabelled)
    assert r.status_code == 422 and "the eval dataset has no 'labels'" in r.json()["detail"]
    for metric in ("agreement", "accuracy"):
        r = submit(wide, metric)
        assert r.status_code == 422 and r.json()["code"] == "invalid_data", r.text
        assert "class ids go up to 12, but the model outputs 10 values" in r.json()["detail"]
    r = submit(labelled, "f1")
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    assert _count(settings, Job) == 0

    r = submit(wide, "cosine")  # an embedding metric does not use the labels
    assert r.status_code == 202, r.text
    assert r.json()["constraints"]["metric"] == "cosine"
    r = submit(labelled, "auto")
    assert r.status_code == 202 and r.json()["constraints"]["metric"] == "auto"
    assert _count(settings, Job) == 2
