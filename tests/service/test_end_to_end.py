"""End to end through a real Celery worker process and the real engine.

A tiny MLP trained on digits is uploaded as .pt2 with its data; a job with a small explicit
recipe runs in the worker; model.onnx is downloaded, its sha256 checked against the ETag and
run in ONNX Runtime. Parametrized: production shape (Postgres + Redis + postgres store) and the
embedded default (SQLite + kombu SQLAlchemy broker + local store).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db.migrate import upgrade
from app.main import create_app
from tests.service.conftest import (
    Worker,
    embedded_env,
    new_key,
    npz_bytes,
    settings_from_env,
    start_worker,
    stop_worker,
    truncate_all,
)

pytestmark = pytest.mark.service

TERMINAL = {"succeeded", "failed", "cancelled"}
STACKS = ["postgres", "embedded"]
# Tests whose code path does not depend on the stack (the same service code runs on both) ask
# for the production one only: the case is not generated for the embedded stack, rather than
# generated and skipped. Indirect, so it is the same module-scoped ``stack`` (index 0 in both
# lists: one Postgres stack for the whole module).
postgres_only = pytest.mark.parametrize("stack", [STACKS[0]], indirect=True)
FAST_RECIPE = {"prune_ratio": 0.0, "quant": "int8_static", "distill_epochs": 0}


@dataclass
class Stack:
    name: str
    client: TestClient
    auth: dict[str, str]
    worker: Worker
    settings: Settings


@pytest.fixture(scope="module", params=STACKS)
def stack(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if request.param == "postgres":
        settings = request.getfixturevalue("settings")
        worker = request.getfixturevalue("pg_worker")
        own_worker = False
    else:
        tmp = tmp_path_factory.mktemp("embedded")
        env = embedded_env(tmp)
        settings = settings_from_env(env)
        upgrade(settings.database_url)
        worker = start_worker(env, tmp / "worker.log")
        own_worker = True
    key = new_key(settings, f"e2e-{request.param}")
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            yield Stack(request.param, client, {"Authorization": f"Bearer {key}"}, worker,
                        settings)
    finally:
        if own_worker:
            stop_worker(worker)
        else:
            truncate_all(settings.database_url)


def wait_for(stack: Stack, job_id: str, until: set[str], timeout_s: float = 240,
             stages: set[str] | None = None,
             ) -> tuple[dict[str, Any], list[tuple[str, str | None, float]]]:
    """Poll until the status is in ``until`` (and, if given, the stage in ``stages``)."""
    seen: list[tuple[str, str | None, float]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = stack.client.get(f"/v1/jobs/{job_id}", headers=stack.auth).json()
        point = (job["status"], job["stage"], job["progress"])
        if not seen or seen[-1] != point:
            seen.append(point)
        if job["status"] in until and (stages is None or job["stage"] in stages
                                        or job["status"] in TERMINAL):
            return job, seen
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} still {seen[-1:]} after {timeout_s} s; worker log:\n"
                         + stack.worker.output()[-3000:])


@pytest.fixture(scope="module")
def uploaded(stack: Stack, mlp_files: dict[str, Path]) -> tuple[str, str]:
    c, auth = stack.client, stack.auth
    r = c.post("/v1/models?filename=mlp.pt2", content=mlp_files["pt2"].read_bytes(),
               headers={**auth, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    model = r.json()
    name = model["inputs"][0]["name"]
    x, y = np.load(mlp_files["x"])[:600], np.load(mlp_files["y"])[:600]
    r = c.post(f"/v1/datasets?model_id={model['id']}&filename=data.npz",
               content=npz_bytes(**{name: x, "labels": y}), headers=auth)
    assert r.status_code == 201, r.text
    return model["id"], r.json()["id"]


def test_compress_download_and_run(stack: Stack, uploaded: tuple[str, str],
                                   mlp_files: dict[str, Path]) -> None:
    import onnxruntime as ort

    c, auth = stack.client, stack.auth
    model_id, dataset_id = uploaded
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["broker"] == "ok", ready.text
    r = c.post("/v1/jobs", headers={**auth, "Idempotency-Key": f"e2e-{stack.name}"}, json={
        "model_id": model_id, "dataset_id": dataset_id, "recipe": FAST_RECIPE,
        "constraints": {"batch_size": 64, "threads": 1, "time_budget_s": 180},
        "device": "cpu"})
    assert r.status_code == 202, r.text
    t0 = time.monotonic()
    job, seen = wait_for(stack, r.json()["id"], TERMINAL)
    elapsed = time.monotonic() - t0
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0 and job["attempt"] == 1 and job["error"] is None
    assert job["started_at"] and job["finished_at"] and job["finished_at"] >= job["started_at"]
    assert any(s == "running" for s, _, _ in seen), seen
    progress = [p for s, _, p in seen if s == "running"]
    assert progress == sorted(progress), f"progress went backwards: {seen}"
    best = job["metrics"]["best"]
    assert best["recipe"]["quant"] == "int8_static" and best["size_bytes"] > 0
    assert job["metrics"]["baseline"]["quality_kind"] == "accuracy"
    # 20 % of 600 samples held out: the job result warns and recommends an eval dataset.
    lo, hi = best["quality_drop_ci95"]
    assert lo <= job["metrics"]["baseline"]["quality"] - best["quality"] <= hi
    assert [w for w in job["metrics"]["warnings"] if "only 120 samples" in w
            and "eval_dataset_id" in w], job["metrics"]["warnings"]
    stage_s = job["metrics"]["stage_seconds"]
    assert {"load", "baseline"} <= set(stage_s) and sum(stage_s.values()) <= elapsed + 1, stage_s

    arts = {a["name"]: a for a in
            c.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json()["items"]}
    assert {"model.onnx", "report.json"} <= set(arts), arts
    d = c.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx", headers=auth)
    assert d.status_code == 200
    digest = hashlib.sha256(d.content).hexdigest()
    assert d.headers["etag"] == f'"{digest}"' and arts["model.onnx"]["sha256"] == digest
    assert len(d.content) == arts["model.onnx"]["size_bytes"] == best["size_bytes"]
    tail = c.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx",
                 headers={**auth, "Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == d.content[-100:]

    sess = ort.InferenceSession(d.content, providers=["CPUExecutionProvider"])
    x = np.load(mlp_files["x"])[600:856]  # samples the job never saw
    y = np.load(mlp_files["y"])[600:856]
    ref = np.load(mlp_files["logits"])[600:856]
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert out.shape == (256, 10)
    agreement = float((out.argmax(1) == ref.argmax(1)).mean())
    accuracy = float((out.argmax(1) == y).mean())
    fp32_accuracy = float((ref.argmax(1) == y).mean())
    assert agreement >= 0.95, agreement  # int8 of a tiny MLP keeps its decisions
    assert accuracy >= fp32_accuracy - 0.05, (accuracy, fp32_accuracy)

    report = c.get(f"/v1/jobs/{job['id']}/report", headers=auth)
    assert report.status_code == 200 and isinstance(report.json(), dict) and report.json()
    print(f"\n[{stack.name}] job took {elapsed:.1f} s {stage_s}; int8 {len(d.content)} B; "
          f"agreement {agreement:.3f}, accuracy {accuracy:.3f} vs fp32 {fp32_accuracy:.3f}")


@postgres_only  # one cancel path is enough; embedded runs the same service code
def test_cancel_running_job(stack: Stack, uploaded: tuple[str, str]) -> None:
    c, auth = stack.client, stack.auth
    model_id, dataset_id = uploaded
    r = c.post("/v1/jobs", headers=auth, json={
        "model_id": model_id, "dataset_id": dataset_id, "device": "cpu",
        "recipe": {**FAST_RECIPE, "prune_ratio": 0.5, "distill_epochs": 500},
        "constraints": {"batch_size": 64, "threads": 1, "time_budget_s": 600}})
    assert r.status_code == 202
    job_id = r.json()["id"]
    # Cancel inside the engine (distillation), not before it starts.
    job, _ = wait_for(stack, job_id, {"running", *TERMINAL}, timeout_s=150, stages={"distill"})
    assert job["status"] == "running" and job["stage"] == "distill", job
    t0 = time.monotonic()
    r = c.post(f"/v1/jobs/{job_id}:cancel", headers=auth)
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    job, _ = wait_for(stack, job_id, TERMINAL, timeout_s=120)
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled", job
    # Cancelled inside the engine, at a progress point after distillation began. Early
    # stopping (patience) can end distillation of this easy model before the cancel lands,
    # so the stage may already be a later one; never an earlier one.
    assert job["stage"] in {"distill", "evaluate", "export"}, job
    print(f"\ncancel took effect after {time.monotonic() - t0:.1f} s (stage {job['stage']})")


def test_reaper_requeues_a_dead_workers_job(stack: Stack, uploaded: tuple[str, str]) -> None:
    """A job whose worker died (lease expired, no heartbeat) is requeued and a live worker
    claims it as attempt 2. Postgres: by the maintenance task sent to the worker (what beat
    does); embedded: by the maintenance thread in the worker's main process."""
    from datetime import timedelta

    from app.db.base import utcnow
    from app.db.models import Job, Model
    from app.db.session import session_factory
    from workers.celery_app import create_celery

    settings = stack.settings
    model_id, dataset_id = uploaded
    with session_factory(settings)() as s:
        model = s.get(Model, model_id)
        assert model is not None
        past = utcnow() - timedelta(minutes=5)
        job = Job(tenant_id=model.tenant_id, model_id=model_id, dataset_id=dataset_id,
                  constraints={"batch_size": 64, "threads": 1, "time_budget_s": 600},
                  recipe={**FAST_RECIPE, "prune_ratio": 0.5, "distill_epochs": 500},
                  device="cpu", queue="cpu", status="running", attempt=1,
                  lease_owner="dead-host:1:gone", lease_expires_at=past, heartbeat_at=past,
                  started_at=past, enqueued_at=past)
        s.add(job)
        s.commit()
        job_id = job.id
    if stack.name == "postgres":
        create_celery(settings).send_task("modelpress.maintenance.tick", queue="cpu")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = stack.client.get(f"/v1/jobs/{job_id}", headers=stack.auth).json()
        if got["attempt"] == 2 and got["status"] == "running":
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"not re-claimed: {got}\n{stack.worker.output()[-2000:]}")
    r = stack.client.post(f"/v1/jobs/{job_id}:cancel", headers=stack.auth)
    assert r.status_code == 200
    done, _ = wait_for(stack, job_id, TERMINAL, timeout_s=60)
    assert done["status"] == "cancelled" and done["attempt"] == 2


@postgres_only  # same service code on both stacks
def test_unsatisfiable_constraints_fail_but_keep_artifacts(stack: Stack,
                                                           uploaded: tuple[str, str]) -> None:
    c, auth = stack.client, stack.auth
    model_id, dataset_id = uploaded
    r = c.post("/v1/jobs", headers=auth, json={
        "model_id": model_id, "dataset_id": dataset_id, "device": "cpu", "recipe": FAST_RECIPE,
        "constraints": {"max_size_mb": 0.001, "batch_size": 64, "threads": 1}})
    assert r.status_code == 202
    job, _ = wait_for(stack, r.json()["id"], TERMINAL)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "constraints_unsatisfiable" and "size" in job["error"]["detail"]
    assert job["metrics"]["best"]["feasible"] is False and job["metrics"]["candidates"]
    names = {a["name"] for a in
             c.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth).json()["items"]}
    assert {"model.onnx", "report.json"} <= names
    d = c.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx", headers=auth)
    assert d.status_code == 200 and d.headers["etag"] == (
        f'"{hashlib.sha256(d.content).hexdigest()}"')
    assert c.get(f"/v1/jobs/{job['id']}/report", headers=auth).status_code == 200
