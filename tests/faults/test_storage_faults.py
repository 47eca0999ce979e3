"""A storage error while writing an artifact (issue 4, faults 11).

Two real failures, one per backend, each hitting a write in the middle of a job's artifact set
(the service stores candidates.json, model.onnx, model.pt2, report.json in that order):

- ``local``: the store's directory is a tmpfs the test mounts (root) and then shrinks, with
  ``mount -o remount,size=``, to what the uploads use plus 64 KiB: candidates.json fits, the
  int8 model.onnx (about 90 KB) does not, so the kernel returns ENOSPC part-way through it.
- ``postgres``: a trigger on ``blob_chunks`` raises SQLSTATE 53100 (``disk_full``) for the
  chunks of ``model.pt2``, after candidates.json and model.onnx were stored.

Either way the job fails with the stable code ``storage_error``, the API lists and serves no
artifact (not the ones written before the failure either), and no byte of the job is left in
the store: no partial file, no temp file, no chunk.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.config import Settings
from app.db.session import get_engine
from app.main import create_app
from tests.faults.conftest import (
    assert_no_artifacts,
    fault_env,
    upload_mlp,
    wait_terminal,
    work_dirs,
)
from tests.service.conftest import (
    Worker,
    new_key,
    settings_from_env,
    start_worker,
    stop_worker,
    truncate_all,
)

FAST_RECIPE = {"prune_ratio": 0.0, "quant": "int8_static", "distill_epochs": 0}
ROOM_BYTES = 64 * 1024  # free space left on the tmpfs for the job's artifacts

DISK_FULL_TRIGGER = """
CREATE FUNCTION mp_test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'could not extend file: No space left on device'
    USING ERRCODE = 'disk_full';
END $$;
CREATE TRIGGER mp_test_disk_full BEFORE INSERT ON blob_chunks FOR EACH ROW
  WHEN (NEW.key LIKE 'jobs/%/model.pt2') EXECUTE FUNCTION mp_test_disk_full();
"""
DROP_TRIGGER = """
DROP TRIGGER IF EXISTS mp_test_disk_full ON blob_chunks;
DROP FUNCTION IF EXISTS mp_test_disk_full();
"""


@dataclass
class Stack:
    backend: str
    client: TestClient
    auth: dict[str, str]
    worker: Worker
    settings: Settings
    work: Path
    store_dir: Path | None
    model_id: str
    dataset_id: str


def _sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()} "
                    "(this test mounts a tmpfs: it needs root)", pytrace=False)


def _used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture(scope="module", params=["local", "postgres"])
def stack(request: pytest.FixtureRequest, faults_pg_url: str, faults_redis_url: str,
          mlp_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[Stack]:
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"storage-{backend}")
    store_dir = tmp / "store" if backend == "local" else None
    # No maintenance pass in the worker: it would sweep an ended job's work directory and
    # hide a run that failed to remove its own.
    env = fault_env(faults_pg_url, faults_redis_url, tmp, MODELPRESS_REAPER_IN_WORKER="false",
                    MODELPRESS_STORAGE_BACKEND=backend)
    if store_dir is not None:
        store_dir.mkdir()
        _sh("mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(store_dir))
        env["MODELPRESS_STORAGE_DIR"] = str(store_dir)
    settings = settings_from_env(env)
    worker: Worker | None = None
    try:
        key = new_key(settings, f"faults-storage-{backend}")
        auth = {"Authorization": f"Bearer {key}"}
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            model_id, dataset_id = upload_mlp(client, auth, mlp_files)
            if store_dir is not None:  # the uploads fit; the artifacts will not
                _sh("mount", "-o", f"remount,size={_used_bytes(store_dir) + ROOM_BYTES}",
                    str(store_dir))
            else:
                with get_engine(faults_pg_url).begin() as conn:
                    conn.execute(text(DISK_FULL_TRIGGER))
            worker = start_worker(env, tmp / "worker.log")
            yield Stack(backend, client, auth, worker, settings, tmp / "work", store_dir,
                        model_id, dataset_id)
    finally:
        if worker is not None:
            stop_worker(worker)
        if store_dir is not None:
            subprocess.run(["umount", str(store_dir)], check=False)
        else:
            with get_engine(faults_pg_url).begin() as conn:
                conn.execute(text(DROP_TRIGGER))
        truncate_all(faults_pg_url)


def test_storage_error_fails_job_and_leaves_no_artifact(stack: Stack) -> None:
    r = stack.client.post("/v1/jobs", headers=stack.auth, json={
        "model_id": stack.model_id, "dataset_id": stack.dataset_id, "device": "cpu",
        "recipe": FAST_RECIPE, "constraints": {"batch_size": 64, "threads": 1,
                                               "time_budget_s": 300}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    row = wait_terminal(stack.settings.database_url, job_id, 120, stack.worker.output)
    assert (row.status, row.error_code, row.attempt) == ("failed", "storage_error", 1), \
        tuple(row)
    # The write that failed came after others succeeded: their bytes had to be removed too.
    failed_on = "model.onnx" if stack.backend == "local" else "model.pt2"
    assert f"could not store artifact '{failed_on}'" in row.error_detail, row.error_detail
    reason = "No space left on device"
    assert reason in row.error_detail and "INSERT" not in row.error_detail, row.error_detail
    got = stack.client.get(f"/v1/jobs/{job_id}", headers=stack.auth).json()
    assert got["status"] == "failed" and got["error"]["code"] == "storage_error", got
    assert_no_artifacts(stack.client, stack.auth, stack.settings.database_url, job_id)
    if stack.store_dir is not None:
        left = [p for p in stack.store_dir.rglob("*") if p.is_file() and job_id in str(p)]
        assert left == [], left  # no partial file, no temp file, nothing of candidates.json
    assert work_dirs(stack.work, job_id) == []
