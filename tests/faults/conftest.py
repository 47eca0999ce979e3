"""Fault-injection suite: shared fixtures.

Every test under tests/faults gets the ``faults`` marker (added at collection) and runs in the
default ``make test``. The real servers come from tests/service/conftest.py's helpers; this
suite has its OWN Postgres database and its own Redis DB number, so a fault test (a worker
with a fast reaper, a killed process) never touches the rows or messages of the service suite.

Redis DB: MODELPRESS_TEST_FAULTS_REDIS_DB (default 14; the service suite flushes 11-13) on
MODELPRESS_TEST_REDIS. Tests that restart servers start their own (tests/faults/servers.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.service.conftest import (
    LIMITS_OFF,
    Worker,
    create_database,
    drop_database,
    flushed_redis_db,
    mlp_files,
    new_key,
    settings_from_env,
    start_worker,
    stop_worker,
    truncate_all,
)

__all__ = ["faults_pg_url", "faults_redis_url", "mlp_files"]

FAULTS_REDIS_DB = int(os.environ.get("MODELPRESS_TEST_FAULTS_REDIS_DB", "14"))
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def faults_pg_url() -> Iterator[str]:
    """A fresh database migrated to head, for this suite only; dropped at the end."""
    from app.db.migrate import upgrade

    url = create_database("mp_faults")
    upgrade(url)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def faults_redis_url() -> Iterator[str]:
    """Redis DB FAULTS_REDIS_DB, flushed before and after; fails (never skips) if unreachable."""
    yield from flushed_redis_db(FAULTS_REDIS_DB)


# --- helpers for tests that run jobs on a real worker -----------------------------------------

TERMINAL = {"succeeded", "failed", "cancelled"}
ALL_ARTIFACTS = ["candidates.json", "model.onnx", "model.pt2", "report.json"]


def fault_env(pg_url: str, redis_url: str, tmp: Path, **overrides: str) -> dict[str, str]:
    """Worker/API environment with short leases: a dead worker's job is reaped within about
    JOB_LEASE_S + REAPER_INTERVAL_S seconds. The lease stays far above the heartbeat (30x):
    on 2 loaded cores a heartbeat thread was seen starved of the GIL for 4.5 s during
    quantization, and a 5 s lease then had a live job reaped."""
    env = {
        "MODELPRESS_DATABASE_URL": pg_url,
        "MODELPRESS_BROKER_URL": redis_url,
        "MODELPRESS_STORAGE_BACKEND": "postgres",
        "MODELPRESS_TMP_DIR": str(tmp / "work"),
        "MODELPRESS_DEV_KEY_BOOTSTRAP": "false",
        "MODELPRESS_AUTH_CACHE_S": "0",
        **LIMITS_OFF,  # per-tenant limits are tested in tests/service/test_limits.py
        "MODELPRESS_REAPER_IN_WORKER": "true",
        "MODELPRESS_REAPER_INTERVAL_S": "0.5",
        "MODELPRESS_JOB_LEASE_S": "15",
        "MODELPRESS_HEARTBEAT_INTERVAL_S": "0.5",
        "MODELPRESS_PROGRESS_WRITE_INTERVAL_S": "0.2",
        "MODELPRESS_MAX_ATTEMPTS": "2",
    }
    env.update(overrides)
    return env



@dataclass
class Stack:
    """A real worker, an in-process API client with a tenant key, and the uploaded MLP."""

    client: TestClient
    auth: dict[str, str]
    worker: Worker
    settings: Settings
    work: Path  # MODELPRESS_TMP_DIR: the jobs' work directories
    model_id: str
    dataset_id: str


@contextlib.contextmanager
def running_stack(env: dict[str, str], tmp: Path, pg_url: str, files: dict[str, Path],
                  tenant: str, samples: int = 600) -> Iterator[Stack]:
    """Start a worker on ``env``, upload the MLP as ``tenant``; stop it and empty the
    database afterwards."""
    settings = settings_from_env(env)
    worker = start_worker(env, tmp / "worker.log")
    try:
        auth = {"Authorization": f"Bearer {new_key(settings, tenant)}"}
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            model_id, dataset_id = upload_mlp(client, auth, files, samples=samples)
            yield Stack(client, auth, worker, settings, tmp / "work", model_id, dataset_id)
    finally:
        stop_worker(worker)
        truncate_all(pg_url)


def upload_mlp(client: Any, auth: dict[str, str], files: dict[str, Path],
               samples: int = 600) -> tuple[str, str]:
    """The service suite's tiny digits MLP and ``samples`` labelled rows; (model, dataset)."""
    import numpy as np

    from tests.service.conftest import npz_bytes

    r = client.post("/v1/models?filename=mlp.pt2", content=files["pt2"].read_bytes(),
                    headers={**auth, "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    model = r.json()
    x, y = np.load(files["x"])[:samples], np.load(files["y"])[:samples]
    r = client.post(f"/v1/datasets?model_id={model['id']}&filename=data.npz",
                    content=npz_bytes(**{model["inputs"][0]["name"]: x, "labels": y}),
                    headers=auth)
    assert r.status_code == 201, r.text
    return model["id"], r.json()["id"]


def job_row(db_url: str, job_id: str) -> Any:
    """The job's row straight from the database (what the worker wrote, no API in between)."""
    from sqlalchemy import text

    from app.db.session import get_engine

    with get_engine(db_url).connect() as conn:
        return conn.execute(text(
            "SELECT status, stage, attempt, max_attempts, lease_owner, error_code, "
            "error_detail FROM jobs WHERE id = :id"), {"id": job_id}).one()


def wait_terminal(db_url: str, job_id: str, timeout_s: float, log: Any = None) -> Any:
    """Poll until the job is succeeded / failed / cancelled; fail with the worker log if not
    (a job stuck ``running`` fails here)."""
    deadline = time.monotonic() + timeout_s
    row = job_row(db_url, job_id)
    while time.monotonic() < deadline:
        row = job_row(db_url, job_id)
        if row.status in TERMINAL:
            return row
        time.sleep(0.1)
    tail = "" if log is None else log()[-4000:]
    pytest.fail(f"job {job_id} not terminal after {timeout_s} s: {tuple(row)}\n{tail}")


def stored_keys(db_url: str, job_id: str) -> tuple[set[str], set[str]]:
    """(storage keys of the job's artifact rows, keys of its bytes in the postgres store)."""
    from sqlalchemy import text

    from app.db.session import get_engine

    with get_engine(db_url).connect() as conn:
        rows = {k for (k,) in conn.execute(
            text("SELECT storage_key FROM artifacts WHERE job_id = :id"), {"id": job_id})}
        blobs = {k for (k,) in conn.execute(
            text("SELECT DISTINCT key FROM blob_chunks WHERE key LIKE :p"),
            {"p": f"jobs/{job_id}/%"})}
    return rows, blobs


def assert_one_artifact_set(client: Any, auth: dict[str, str], db_url: str, job_id: str,
                            attempt: int) -> None:
    """Exactly one set: every artifact listed once, from ``attempt``, downloadable with the
    listed sha256; and no stored bytes of the job that no row points at."""
    import hashlib

    r = client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert sorted(a["name"] for a in items) == ALL_ARTIFACTS, items
    rows, blobs = stored_keys(db_url, job_id)
    assert rows == {f"jobs/{job_id}/attempt-{attempt}/{n}" for n in ALL_ARTIFACTS}, rows
    assert blobs == rows, f"orphan bytes: {sorted(blobs - rows)}"
    for a in items:
        d = client.get(f"/v1/jobs/{job_id}/artifacts/{a['name']}", headers=auth)
        assert d.status_code == 200, d.text
        assert hashlib.sha256(d.content).hexdigest() == a["sha256"]
        assert len(d.content) == a["size_bytes"]


def assert_no_artifacts(client: Any, auth: dict[str, str], db_url: str, job_id: str) -> None:
    r = client.get(f"/v1/jobs/{job_id}/artifacts", headers=auth)
    assert r.status_code == 200 and r.json()["items"] == [], r.text
    for name in ALL_ARTIFACTS:
        d = client.get(f"/v1/jobs/{job_id}/artifacts/{name}", headers=auth)
        assert d.status_code == 404, (name, d.status_code)
    rows, blobs = stored_keys(db_url, job_id)
    assert rows == set() and blobs == set(), (rows, blobs)


def work_dirs(tmp_dir: Path, job_id: str) -> list[Path]:
    """The job's work directories (the service's, holding the engine's) left on disk."""
    return sorted(tmp_dir.glob(f"modelpress-{job_id}-*"))
