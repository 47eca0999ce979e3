"""The OpenAPI document is the contract: a client generated from it by openapi-python-client
(the live /openapi.json of a running server; any generator warning fails the test) drives a
whole job against the real stack (uvicorn, Postgres, Redis, a Celery worker process, the real
engine): upload model and data, submit, poll, read the typed report, download with the sha256
checked against the ETag, and a 404 and a 422 parsed as ``Problem``.

Before this, the generator dropped ``JobCreate`` (a hand-written ``anyOf``), parsed
``model.onnx`` as JSON, and returned ``None`` for every error.
"""

from __future__ import annotations

import hashlib
import importlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.service.conftest import npz_bytes

pytestmark = pytest.mark.service

GENERATOR = Path(sys.executable).parent / "openapi-python-client"
PACKAGE = "model_press_client"  # from the document's title, "ModelPress"
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def gen(live_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    out = tmp_path_factory.mktemp("generated")
    config = out / "config.yaml"
    config.write_text("post_hooks: []\n")  # no ruff formatting pass: not what is tested
    res = subprocess.run(
        [str(GENERATOR), "generate", "--url", f"{live_server}/openapi.json", "--config",
         str(config), "--output-path", str(out / "client"), "--fail-on-warning"],
        capture_output=True, text=True, timeout=120)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    for word in ("Warning", "Unable to", "Could not", "removal"):
        assert word not in text, text
    sys.path.insert(0, str(out / "client"))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out / "client"))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _mod(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


def test_generated_client_runs_a_whole_job(gen: ModuleType, live_server: str,
                                           client_key: str, pg_worker: Any,
                                           mlp_files: dict[str, Path]) -> None:
    import onnxruntime as ort

    m, types = _mod("models"), _mod("types")
    api = {op: _mod(f"api.{mod}.{op}") for mod, op in (
        ("models", "upload_model"), ("datasets", "upload_dataset"), ("jobs", "create_job"),
        ("jobs", "get_job"), ("jobs", "list_artifacts"), ("jobs", "download_artifact"),
        ("jobs", "head_artifact"), ("jobs", "get_job_report"), ("jobs", "list_jobs"))}
    client = gen.AuthenticatedClient(base_url=live_server, token=client_key,
                                     raise_on_unexpected_status=True)

    with mlp_files["pt2"].open("rb") as f:
        r = api["upload_model"].sync_detailed(
            client=client, body=types.File(payload=f, file_name="mlp.pt2"), filename="mlp.pt2")
    assert r.status_code == 201, r.content
    model = r.parsed
    assert isinstance(model, m.ModelOut) and model.format_ == "pt2"
    name = model.inputs[0].name
    x, y = np.load(mlp_files["x"]), np.load(mlp_files["y"])
    data = npz_bytes(**{name: x[:600], "labels": y[:600]})
    r = api["upload_dataset"].sync_detailed(
        client=client, body=types.File(payload=data, file_name="data.npz"), model_id=model.id,
        filename="data.npz")
    assert r.status_code == 201, r.content
    dataset = r.parsed
    assert isinstance(dataset, m.DatasetOut) and dataset.samples == 600 and dataset.has_labels

    # A small explicit recipe (int8 static, no pruning or distillation): a few seconds' work.
    body = m.JobCreate(model_id=model.id, dataset_id=dataset.id, device=m.JobCreateDevice.CPU,
                       recipe=m.RecipeIn(prune_ratio=0.0, quant=m.RecipeInQuant.INT8_STATIC,
                                         distill_epochs=0),
                       constraints=m.ConstraintsIn(batch_size=64, threads=1))
    r = api["create_job"].sync_detailed(client=client, body=body,
                                        idempotency_key="generated-client-1")
    assert r.status_code == 202, r.content
    job = r.parsed
    assert isinstance(job, m.JobOut) and job.status == m.JobOutStatus.QUEUED
    assert r.headers["location"] == f"/v1/jobs/{job.id}"

    deadline = time.monotonic() + 300
    while job.status.value not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.3)
        job = api["get_job"].sync(job.id, client=client)
        assert isinstance(job, m.JobOut)
    assert job.status == m.JobOutStatus.SUCCEEDED, (job.status, job.error, job.message)
    assert job.stage == m.JobStage.DONE and job.progress == 1.0
    metrics = job.metrics
    assert isinstance(metrics, m.JobMetrics) and isinstance(metrics.best, m.BestOut)
    assert metrics.best.recipe.quant == m.RecipeOutQuant.INT8_STATIC
    assert metrics.baseline.size_bytes > metrics.best.size_bytes  # int8 is smaller

    report = api["get_job_report"].sync(job.id, client=client)
    assert isinstance(report, m.JobReport), report
    assert report.chosen.id == report.chosen_index
    assert [c.id for c in report.candidates] == list(range(len(report.candidates)))
    assert [p.candidate_id for p in report.pareto] == report.pareto_front
    assert report.chosen.metrics.size_bytes == metrics.best.size_bytes
    assert report.ratios.size == pytest.approx(
        report.baseline.size_bytes / report.chosen.metrics.size_bytes)

    arts = api["list_artifacts"].sync(job.id, client=client)
    assert isinstance(arts, m.ArtifactList)
    listed = {a.name: a for a in arts.items}
    r = api["download_artifact"].sync_detailed(job.id, "model.onnx", client=client)
    assert r.status_code == 200 and isinstance(r.parsed, types.File)
    blob = r.parsed.payload.read()
    digest = hashlib.sha256(blob).hexdigest()
    assert r.headers["etag"] == f'"{digest}"' == f'"{listed["model.onnx"].sha256}"'
    assert len(blob) == listed["model.onnx"].size_bytes == report.chosen.metrics.size_bytes
    r = api["head_artifact"].sync_detailed(job.id, "model.onnx", client=client)
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(blob)
    r = api["download_artifact"].sync_detailed(job.id, "model.onnx", client=client,
                                               range_="bytes=-100")
    assert r.status_code == 206 and r.parsed.payload.read() == blob[-100:]
    r = api["download_artifact"].sync_detailed(job.id, "model.onnx", client=client,
                                               if_none_match=f'"{digest}"')
    assert r.status_code == 304

    # The downloaded model runs and keeps the original's decisions on unseen samples.
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x[600:856]})[0]
    ref = np.load(mlp_files["logits"])[600:856]
    agreement = float((out.argmax(1) == ref.argmax(1)).mean())
    assert out.shape == (256, 10) and agreement >= 0.95, agreement

    # Errors come back parsed as Problem, with the code as an enum.
    r = api["get_job"].sync_detailed("0" * 32, client=client)
    assert r.status_code == 404 and isinstance(r.parsed, m.Problem), r.content
    assert r.parsed.code == m.ErrorCode.NOT_FOUND and r.parsed.status == 404
    bad = m.JobCreate(model_id=model.id, dataset_id=dataset.id,
                      recipe=m.RecipeIn(prune_ratio=2.0))  # the server's bound is 0.95
    r = api["create_job"].sync_detailed(client=client, body=bad)
    assert r.status_code == 422 and isinstance(r.parsed, m.Problem), r.content
    assert r.parsed.code == m.ErrorCode.VALIDATION_ERROR
    assert isinstance(r.parsed.errors, list)
    assert [e.loc for e in r.parsed.errors] == [["body", "recipe", "prune_ratio"]]
    r = api["list_jobs"].sync_detailed(client=client, limit=1000)
    assert r.status_code == 422 and r.parsed.code == m.ErrorCode.VALIDATION_ERROR
