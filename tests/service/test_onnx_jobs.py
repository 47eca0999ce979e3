"""An ONNX model through the API and a real Celery worker: upload, submit, succeed, download.

Today's main accepts the upload (201, format "onnx") and then fails every job in the worker
with ``invalid_model: 'model.onnx' is not a .pt2 archive``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient

from app.engine.stages.evaluate import compare_latency, make_session
from tests.onnx_example import build_onnx
from tests.service.conftest import Worker

pytestmark = pytest.mark.service

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_onnx(tmp_path_factory.mktemp("onnx_service"))


def _upload(client: TestClient, auth: dict[str, str], files: tuple[Path, Path]) -> tuple[str, str]:
    model, data = files
    r = client.post("/v1/models?filename=model.onnx", content=model.read_bytes(),
                    headers={**auth, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "onnx"
    model_id = r.json()["id"]
    r = client.post(f"/v1/datasets?model_id={model_id}&filename=data.npz",
                    content=data.read_bytes(), headers=auth)
    assert r.status_code == 201, r.text
    return model_id, r.json()["id"]


def _wait(client: TestClient, auth: dict[str, str], job_id: str, worker: Worker,
          timeout_s: float = 300) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
        seen.append(job)
        if job["status"] in TERMINAL:
            return job, seen
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not finished after {timeout_s} s; worker log:\n"
                         + worker.output()[-3000:])


def test_onnx_job_succeeds_with_a_faster_int8_model(
        client: TestClient, auth: dict[str, str], pg_worker: Worker,
        onnx_files: tuple[Path, Path], tmp_path: Path) -> None:
    model_id, dataset_id = _upload(client, auth, onnx_files)
    r = client.post("/v1/jobs", headers=auth, json={
        "model_id": model_id, "dataset_id": dataset_id, "device": "cpu",
        "constraints": {"max_accuracy_drop": 0.02, "batch_size": 8, "threads": 2,
                        "time_budget_s": 240}})
    assert r.status_code == 202, r.text
    job, seen = _wait(client, auth, r.json()["id"], pg_worker)
    assert job["status"] == "succeeded", (job["error"], pg_worker.output()[-3000:])
    assert job["progress"] == 1.0 and job["eta_s"] is None and job["activity"] is None
    best = job["metrics"]["best"]
    assert best["recipe"]["quant"] in ("int8_static", "int8_dynamic")
    assert best["recipe"]["prune_ratio"] == 0 and best["recipe"]["distill_epochs"] == 0
    assert any("not applicable" in w for w in job["metrics"]["warnings"])

    # Progress while running: monotonic, with an ETA and a typed activity.
    running = [j for j in seen if j["status"] == "running"]
    progress = [j["progress"] for j in running]
    assert progress == sorted(progress)
    typed = [j for j in running if j["activity"] is not None]
    assert typed and all(j["activity"]["stage"] == j["stage"] or j["stage"] == "store"
                         for j in typed)
    assert any(j["eta_s"] is not None for j in typed)

    # Artifacts: model.onnx, report.json, candidates.json; no model.pt2 for ONNX input.
    arts = {a["name"]: a for a in
            client.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json()["items"]}
    assert set(arts) == {"model.onnx", "report.json", "candidates.json"}, arts
    d = client.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx", headers=auth)
    assert d.status_code == 200
    assert hashlib.sha256(d.content).hexdigest() == arts["model.onnx"]["sha256"]
    report = client.get(f"/v1/jobs/{job['id']}/report", headers=auth).json()
    assert report["model_format"] == "onnx" and report["status"] == "succeeded"
    assert any("no model.pt2" in w for w in report["warnings"])

    # The artifact: int8 weights, accuracy kept, faster than the upload at batch 8 (measured
    # again here, side by side).
    model, data = onnx_files
    art = tmp_path / "model.onnx"
    art.write_bytes(d.content)
    assert any(i.data_type == onnx.TensorProto.INT8 for i in onnx.load(str(art)).graph.initializer)
    arrays = np.load(data)
    x, y = arrays["x"], arrays["labels"]
    s_base, s_art = make_session(model), make_session(art)
    acc_base = float((s_base.run(None, {"x": x})[0].argmax(1) == y).mean())
    acc_art = float((s_art.run(None, {"x": x})[0].argmax(1) == y).mean())
    assert acc_base > 0.9 and acc_art >= acc_base - 0.02, (acc_art, acc_base)
    # Re-timed the way the engine judges (interleaved rounds, median of per-round ratios, an
    # identical-model control): 9 rounds of p50s alone read a 0.07 ms model 9 % slower on
    # this AVX2 machine once, within its noise.
    cmp = compare_latency(s_base, [s_art], {"x": x[:8]}, control=make_session(model))
    est = cmp.candidates[0]
    base_ms, art_ms = cmp.baseline_p50_ms, est.p50_ms
    assert est.ratio < 1.0, (f"int8 {art_ms:.3f} ms vs uploaded {base_ms:.3f} ms, ratio "
                             f"{est.ratio:.3f} [{est.low:.3f}, {est.high:.3f}], control "
                             f"{cmp.control.ratio:.3f}")
    print(f"\nONNX job: {job['metrics']['baseline']['size_bytes']} -> {best['size_bytes']} B, "
          f"p50 {base_ms:.3f} -> {art_ms:.3f} ms at batch 8, accuracy {acc_base:.4f} -> "
          f"{acc_art:.4f}")


def test_onnx_recipe_asking_for_pruning_is_invalid_recipe(
        client: TestClient, auth: dict[str, str], onnx_files: tuple[Path, Path]) -> None:
    model_id, dataset_id = _upload(client, auth, onnx_files)
    for recipe in ({"prune_ratio": 0.3}, {"distill_epochs": 5}):
        r = client.post("/v1/jobs", headers=auth, json={
            "model_id": model_id, "dataset_id": dataset_id, "recipe": recipe})
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["code"] == "invalid_recipe" and "not applicable" in problem["detail"]
        assert r.headers["content-type"].startswith("application/problem+json")
